#!/bin/sh
# Refuse to start a container while a variable of its environment still holds a placeholder secret
# of docker/.env.example (a value containing "change-me"), then run the container's own command.
# The same rule as `bootstrap.py check-env` (the Airflow and MLflow images), for the images without
# Python: postgres, redis, the S3 store and its set-up (docker/compose.yaml makes this their entry
# point). Only the names of the variables are printed, never their values. Shell builtins only: it runs
# in minimal images.
#   check-env.sh COMMAND [ARGUMENTS...]     exit 78 (EX_CONFIG) on a placeholder, else exec COMMAND
set -eu

placeholder="change-me"
found=""
# `export -p` lists every exported variable (one per line, values quoted); continuation lines of
# multi-line values are skipped by the name check below.
exported="$(export -p)"
while IFS= read -r line; do
    case "$line" in
        "export "*) entry="${line#export }" ;;
        "declare -x "*) entry="${line#declare -x }" ;;
        *) continue ;;
    esac
    name="${entry%%=*}"
    case "$name" in
        "" | [0-9]* | *[!A-Za-z0-9_]*) continue ;;
    esac
    eval "value=\${$name-}"
    case "$value" in
        *"$placeholder"*) found="$found${found:+, }$name" ;;
    esac
done <<EOF_EXPORTS
$exported
EOF_EXPORTS

if [ -n "$found" ]; then
    echo "error: placeholder values from docker/.env.example are still set in: $found; put real secrets in docker/.env (see docker/README.md)" >&2
    exit 78
fi
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
