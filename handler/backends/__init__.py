"""Where runs execute: one interface, one implementation per mode, chosen by one lookup."""
