#!/bin/sh
# Build the base image and every stage image; CUDA variants (<stage>-cuda:<tag>) for finetune and generate.
#   IMAGE_REGISTRY (ghcr.io/ielts-distill)  IMAGE_TAG (0.1.0)  IMAGE_EXTRAS (e.g. local-llm)
#   CUDA_STAGES ("finetune generate"; empty: no CUDA builds)  TORCH_CUDA_INDEX (.../whl/cu128)
#   PYTHON_IMAGE, TORCH_VERSION, TORCH_INDEX (CPU wheels), PIP_FIND_LINKS: base build args, when set
#   BUILDER: docker | buildah (default: docker when its daemon answers, else buildah). Rootless buildah
#   inside a container: BUILDAH_STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot (the defaults here).
set -eu
cd "$(dirname "$0")/.."
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/ielts-distill}"
TAG="${IMAGE_TAG:-0.1.0}"
STAGES="ingest teacher dataset finetune generate judge report"
CUDA_STAGES="${CUDA_STAGES-finetune generate}"
CUDA_INDEX="${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
BUILDER="${BUILDER:-}"
if [ -z "$BUILDER" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then BUILDER=docker
  elif command -v buildah >/dev/null 2>&1; then BUILDER=buildah
  else echo "error: neither a docker daemon nor buildah is available (set BUILDER)" >&2; exit 1
  fi
fi

build() {  # build IMAGE DOCKERFILE [--build-arg K=V ...]
  image="$1"; dockerfile="$2"; shift 2
  echo "== $BUILDER: $image ($dockerfile)"
  case "$BUILDER" in
    docker) docker build --file "$dockerfile" --tag "$image" "$@" . ;;
    buildah) buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}" build --isolation "${BUILDAH_ISOLATION:-chroot}" \
               --layers --file "$dockerfile" --tag "$image" "$@" . ;;
    *) echo "error: BUILDER must be docker or buildah (got '$BUILDER')" >&2; exit 1 ;;
  esac
}

# Optional base overrides, passed only when set: PYTHON_IMAGE, TORCH_VERSION, TORCH_INDEX (CPU), PIP_FIND_LINKS.
set --
for arg in PYTHON_IMAGE TORCH_VERSION PIP_FIND_LINKS; do
  eval "value=\${$arg:-}"
  if [ -n "$value" ]; then set -- "$@" --build-arg "$arg=$value"; fi
done
if [ -n "${TORCH_INDEX:-}" ]; then cpu_index="--build-arg TORCH_INDEX=$TORCH_INDEX"; else cpu_index=""; fi

# shellcheck disable=SC2086  # cpu_index is one word or none
build "$REGISTRY/base:$TAG" images/base/Dockerfile --build-arg "EXTRAS=${IMAGE_EXTRAS:-}" $cpu_index "$@"
for stage in $STAGES; do
  build "$REGISTRY/$stage:$TAG" "images/$stage/Dockerfile" --build-arg "BASE_IMAGE=$REGISTRY/base:$TAG"
done
if [ -n "$CUDA_STAGES" ]; then
  build "$REGISTRY/base-cuda:$TAG" images/base/Dockerfile --build-arg "TORCH_INDEX=$CUDA_INDEX" "$@"
  for stage in $CUDA_STAGES; do
    build "$REGISTRY/$stage-cuda:$TAG" "images/$stage/Dockerfile" --build-arg "BASE_IMAGE=$REGISTRY/base-cuda:$TAG"
  done
fi
