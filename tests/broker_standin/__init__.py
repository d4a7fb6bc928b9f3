"""A Knative Broker stand-in: Triggers read from knative/, retries, dead letters, duplicates."""

from tests.broker_standin.broker import BrokerStandin, Record
from tests.broker_standin.triggers import Delivery, Trigger, load

__all__ = ["BrokerStandin", "Delivery", "Record", "Trigger", "load"]
