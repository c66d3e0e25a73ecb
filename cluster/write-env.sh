#!/usr/bin/env bash
# Write the environment that every node of cluster/ray-cluster.yaml sources before `ray start`
# (and that `ray attach` / `ray exec` shells on the head get), from variables exported in this
# shell. The file lives outside the repository (default ~/.vfsearch/cluster.env, mode 600);
# `ray up` copies it to the nodes through file_mounts. Never commit it.
#
#   export MLFLOW_TRACKING_URI=http://10.0.1.20:5000          # private address of the server
#   export MLFLOW_TRACKING_USERNAME=vfsearch
#   read -rs MLFLOW_TRACKING_PASSWORD && export MLFLOW_TRACKING_PASSWORD
#   cluster/write-env.sh [OUT]
set -euo pipefail

out=${1:-$HOME/.vfsearch/cluster.env}

# Needed on every node: rank 0 of each training logs to MLflow with these.
required=(MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD)
# Passed on when set: S3 credentials for `--storage s3://...` on nodes without an instance
# profile, and MLflow TLS settings.
optional=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_DEFAULT_REGION
          MLFLOW_TRACKING_SERVER_CERT_PATH MLFLOW_TRACKING_INSECURE_TLS)

for name in "${required[@]}"; do
    if [[ -z "${!name:-}" ]]; then
        echo "write-env.sh: $name is not set; export it first" >&2
        exit 2
    fi
done

umask 077
mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
{
    echo "# Written by cluster/write-env.sh; sourced by the Ray start commands. Do not commit."
    # The custom resource the trial drivers request (`vfsearch tune --driver-resource`).
    echo "export VFSEARCH_DRIVER_RESOURCE=vfsearch_driver"
    for name in "${required[@]}" "${optional[@]}"; do
        if [[ -n "${!name+set}" ]]; then
            printf 'export %s=%q\n' "$name" "${!name}"
        fi
    done
} > "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out"
