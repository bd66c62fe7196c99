"""Kubernetes for a run: the Jobs, ConfigMap and driver Job (objects.py, official client models), the Argo
Workflow (argo.py, hera), the image plan read by build.sh and skaffold (images.py), and Job/Pod/Event state
read into verdicts and waiting notes (diagnose.py). The driver is pipeline.executors.k8s."""
