#!/bin/sh
# Entry point of the steerserve image.
#
# With no arguments, or with only options (docker run IMAGE --max-batch-size 8), it serves on
# 0.0.0.0:8000; any other command (steerserve vectors inspect ..., sh) runs as given.
# Before `steerserve serve` with the default model, it runs `steerserve model prepare`, which is
# idempotent: instant when the model is baked into the image or already in the /data/cache volume,
# about 20 s on first use otherwise (e.g. an image built with PREPARE_MODEL=0, or an empty bind mount).
# Set STEERSERVE_PREPARE_ON_START=0 to skip it.
set -eu

if [ "$#" -eq 0 ]; then
    set -- steerserve serve --host 0.0.0.0 --port 8000
fi
case "$1" in
    -*) set -- steerserve serve --host 0.0.0.0 --port 8000 "$@" ;;
esac

if [ "$1" = "steerserve" ] && [ "${2:-}" = "serve" ] && [ -z "${STEERSERVE_MODEL:-}" ] \
        && [ "${STEERSERVE_PREPARE_ON_START:-1}" = "1" ]; then
    custom_model=0
    for arg in "$@"; do
        case "$arg" in
            --model|--model=*) custom_model=1 ;;
        esac
    done
    if [ "$custom_model" = "0" ]; then
        # An assignment from a failing command substitution stops the script (set -e).
        prepare_out="$(steerserve model prepare)"
        model_path="$(printf '%s\n' "$prepare_out" | tail -n 1)"
        echo "steerserve-entrypoint: default model ready at ${model_path}" >&2
    fi
fi

exec "$@"
