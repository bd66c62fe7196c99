"""Kubernetes objects for a run, built in one place with the official client models (objects.py), and
the reading of Job/Pod state into one-line verdicts (diagnose.py). The driver is pipeline.executors.k8s."""
