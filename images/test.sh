#!/usr/bin/env bash
# make images-test (run by .ci/run when CI_IMAGES=1): build the base and one stage image with buildah (overlay
# or vfs storage, chroot isolation: works rootless and inside a CI container) FROM a Debian bookworm + Python 3.11
# base made with debootstrap (no container registry needed), then run that stage's entrypoint inside the
# image against the test suite's SeaweedFS S3 server (tests/images_check.py, buildah run).
# make rehearse-images: every stage's image, then tests/images_rehearsal.py runs the kind config's Jobs in them.
#   IMAGE_TEST_STAGE (ingest) or IMAGE_TEST_STAGES ("ingest teacher ..."): the stages to build and check
#   IMAGE_TEST_CHECKS (tests/images_check.py): the pytest files to run on the built images
#   IMAGE_TEST_WORK (build/images-test)  DEBIAN_MIRROR (http://deb.debian.org/debian)
#   TORCH_INDEX, IMAGE_PIP_FIND_LINKS: where the image build finds torch (default: PyTorch's CPU wheel index)
# Needs root for debootstrap (or a prepared localhost/bookworm-python:3.11 image), buildah, ~10 GB of disk (overlay).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES="${IMAGE_TEST_STAGES:-${IMAGE_TEST_STAGE:-ingest}}"
STAGE="${STAGES%% *}"
WORK="${IMAGE_TEST_WORK:-build/images-test}"
PY_IMAGE="localhost/bookworm-python:3.11"
# overlay shares layers (the whole plan: ~8 GB); vfs copies every layer in full (well over 100 GB) but works
# rootless anywhere: overlay when root and the kernel has it, unless BUILDAH_STORAGE_DRIVER says otherwise
if [ -z "${BUILDAH_STORAGE_DRIVER:-}" ]; then
  BUILDAH_STORAGE_DRIVER=vfs
  if [ "$(id -u)" = 0 ] && grep -qw overlay /proc/filesystems; then BUILDAH_STORAGE_DRIVER=overlay; fi
fi
export BUILDER=buildah BUILDAH_STORAGE_DRIVER BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
export IMAGE_REGISTRY=localhost/ielts-test IMAGE_TAG=ci IMAGE_CUDA=0 IMAGE_STAGES="$STAGES" PYTHON_IMAGE="$PY_IMAGE"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install buildah debootstrap)" >&2; exit 1; }
done
bd() { buildah --storage-driver "$BUILDAH_STORAGE_DRIVER" "$@"; }

mkdir -p "$WORK"
if ! bd inspect --type image "$PY_IMAGE" >/dev/null 2>&1; then
  rootfs="$WORK/rootfs"
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  fi
  # trust what the host trusts (a CI proxy's CA); pip's own certifi bundle would not
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$rootfs" -cf "$WORK/rootfs.tar" .
  ctr="$(bd from scratch)"
  bd add "$ctr" "$WORK/rootfs.tar" /
  bd config --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$ctr"
  bd commit --rm "$ctr" "$PY_IMAGE"
fi
images/build.sh
# shellcheck disable=SC2086  # IMAGE_TEST_CHECKS is a list of files
IMAGE_TEST_REF="$IMAGE_REGISTRY/$STAGE:$IMAGE_TAG" IMAGE_TEST_STAGE="$STAGE" IMAGE_TEST_STAGES="$STAGES" \
  "${PYTHON:-.venv/bin/python}" -m pytest -q -p no:cacheprovider ${IMAGE_TEST_CHECKS:-tests/images_check.py}
