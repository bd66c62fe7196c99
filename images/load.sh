#!/bin/sh
# skaffold after-build hook of the `local` profile (skaffold.yaml): load the image just built ($SKAFFOLD_IMAGE)
# into the kind or minikube cluster of the current kube context. skaffold itself loads only images named in
# the deployed manifests, and the Jobs' images are named by the driver, not by k8s/overlays/local.
set -eu
: "${SKAFFOLD_IMAGE:?set by skaffold: the image to load}"
context="${SKAFFOLD_KUBE_CONTEXT:-$(kubectl config current-context)}"
case "$context" in
  kind-*) exec kind load docker-image "$SKAFFOLD_IMAGE" --name "${context#kind-}" ;;
  minikube) exec minikube image load "$SKAFFOLD_IMAGE" ;;
  *) echo "images/load.sh: context '$context' is neither kind-* nor minikube: push the image instead (-p cloud)" >&2
     exit 1 ;;
esac
