#!/bin/sh
# Build the images of the image plan (images/plan.txt, generated from what each stage needs under the shipped
# configs; read through python3 -m pipeline.k8s.images): a base variant per (needs, CPU/CUDA) and one image per
# stage from images/stage/Dockerfile; CUDA variants <stage>-cuda for the stages a config runs on GPUs.
#   IMAGE_PLAN (images/plan.txt; `ielts-distill render --format image-plan --config mine.yaml -o FILE` adds yours)
#   IMAGE_REGISTRY (ghcr.io/ielts-distill)  IMAGE_TAG (pipeline.__version__)  IMAGE_CUDA (1; 0: no CUDA builds)
#   IMAGE_STAGES ("": every stage; e.g. "ingest" builds only ingest and the base it needs)
#   TORCH_CUDA_INDEX (.../whl/cu128); PYTHON_IMAGE, TORCH_VERSION, TORCH_INDEX (CPU wheels): base build args
#   IMAGE_PIP_FIND_LINKS: extra wheel location for the image build (pip's own PIP_FIND_LINKS is NOT forwarded:
#     it is the host pip's setting and usually names a host path)
#   IMAGE_PUSH (0; 1: push each image after its build and record its digest, one `NAME sha256:...` line, in
#     IMAGE_DIGESTS, default build/image-digests-$IMAGE_TAG.txt; the run config's k8s.image_digests names that file
#     and the Jobs then pull <registry>/<name>@sha256:..., never a reused tag)
#   BUILDER: docker | buildah | print (print: only show the build commands). Default: docker when its daemon
#   answers, else buildah. Rootless buildah in a container: BUILDAH_STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
#   (the defaults here).
set -eu
cd "$(dirname "$0")/.."
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/ielts-distill}"
CUDA_INDEX="${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
PYTHON="${PYTHON:-python3}"
TAG="${IMAGE_TAG:-$("$PYTHON" -c 'import pipeline; print(pipeline.__version__)')}"
DIGESTS="${IMAGE_DIGESTS:-build/image-digests-$TAG.txt}"
if [ "${IMAGE_PUSH:-0}" = 1 ] && [ "${BUILDER:-}" != print ]; then mkdir -p "$(dirname "$DIGESTS")"; : > "$DIGESTS"; fi
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
    print) echo "build --file $dockerfile --tag $image $*" ;;
    *) echo "error: BUILDER must be docker, buildah or print (got '$BUILDER')" >&2; exit 1 ;;
  esac
  if [ "${IMAGE_PUSH:-0}" = 1 ]; then push "$image"; fi
}

push() {  # push IMAGE and append "NAME DIGEST" to $DIGESTS
  image="$1"; digest=""
  case "$BUILDER" in
    docker) docker push "$image" >&2
            digest="$(docker inspect --format '{{index .RepoDigests 0}}' "$image")"; digest="${digest##*@}" ;;
    buildah) file="$(mktemp)"
             buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}" push --digestfile "$file" "$image" >&2
             digest="$(cat "$file")"; rm -f "$file" ;;
    print) echo "push $image"; return 0 ;;
  esac
  case "$digest" in sha256:*) ;; *) echo "error: no digest recorded for $image (got '$digest')" >&2; exit 1 ;; esac
  name="${image#"$REGISTRY"/}"; echo "${name%:*} $digest" >> "$DIGESTS"
}

# Base build args passed only when set.
set --
for arg in PYTHON_IMAGE TORCH_VERSION; do
  eval "value=\${$arg:-}"
  if [ -n "$value" ]; then set -- "$@" --build-arg "$arg=$value"; fi
done
if [ -n "${IMAGE_PIP_FIND_LINKS:-}" ]; then set -- "$@" --build-arg "PIP_FIND_LINKS=$IMAGE_PIP_FIND_LINKS"; fi
cpu_index="${TORCH_INDEX:-}"

no_cuda=""
if [ "${IMAGE_CUDA:-1}" = 0 ]; then no_cuda="--no-cuda"; fi
# shellcheck disable=SC2086  # IMAGE_STAGES is a list of words
plan="$("$PYTHON" -m pipeline.k8s.images --plan "${IMAGE_PLAN:-images/plan.txt}" $no_cuda ${IMAGE_STAGES:-})"
echo "$plan" | while read -r kind name what base; do
  if [ "$kind" = base ]; then
    if [ "$base" = 1 ]; then index="$CUDA_INDEX"; else index="$cpu_index"; fi
    if [ "$what" = - ]; then what=""; fi
    if [ -n "$index" ]; then
      build "$REGISTRY/$name:$TAG" images/base/Dockerfile --build-arg "EXTRAS=$what" --build-arg "TORCH_INDEX=$index" "$@"
    else
      build "$REGISTRY/$name:$TAG" images/base/Dockerfile --build-arg "EXTRAS=$what" "$@"
    fi
  else
    build "$REGISTRY/$name:$TAG" images/stage/Dockerfile --build-arg "STAGE=$what" --build-arg "BASE_IMAGE=$REGISTRY/$base:$TAG"
  fi
done
