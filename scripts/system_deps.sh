#!/usr/bin/env bash
# Debian packages mmadapters' tests and data generators need (idempotent; installs only what is missing):
#   espeak-ng — speech synthesis for generated multilingual speech (python -m mmadapters.speech.synth)
set -euo pipefail
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
