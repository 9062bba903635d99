#!/usr/bin/env bash
# Turn a container image into the squashfs file pyxis/enroot clusters run
# (SLURM: run.executor.container_image=<the .sqsh path>).
#
#   containers/enroot_import.sh nemo_opd:latest /shared/containers/nemo_opd.sqsh
#       an image in the local Docker daemon (built from containers/Dockerfile)
#   containers/enroot_import.sh nvcr.io/myorg/nemo_opd:0.1 /shared/containers/nemo_opd.sqsh
#       an image in a registry (credentials in ~/.config/enroot/.credentials for nvcr.io)
#
# Run it on a node with enroot (a login or compute node) and write the file to the shared
# filesystem that every compute node mounts.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 IMAGE OUTPUT.sqsh" >&2
  exit 2
fi
image=$1
out=$2
case "$out" in
  *.sqsh) ;;
  *) echo "$0: output must end in .sqsh, got $out" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$out")"
if docker image inspect "$image" > /dev/null 2>&1; then
  uri="dockerd://$image"                     # local Docker daemon
elif [[ "$image" == */* && "${image%%/*}" == *[.:]* ]]; then
  uri="docker://${image%%/*}#${image#*/}"   # a registry host: enroot's host#repo:tag syntax
else
  uri="docker://$image"                      # Docker Hub
fi
echo "enroot import -o $out $uri" >&2
enroot import -o "$out" "$uri"
