"""Remote mode: runs on a Kubeflow Pipelines server, artifacts and result manifests in S3."""
