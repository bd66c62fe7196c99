"""Kubernetes for a run: the Jobs, ConfigMap and driver Job (objects.py, official client models), the Argo
Workflow (argo.py, hera), the image plan read by build.sh and skaffold (images.py), Job/Pod/Event state read
into verdicts and waiting notes (diagnose.py), and the API client with its log follower (client.py). The
driver on top of them is pipeline.executors.k8s."""
