"""Start the MLflow tracking server for a vfsearch cluster: basic auth on, PostgreSQL backend
store, artifacts proxied to S3 or MinIO.

Everything comes from the environment (Kubernetes secrets, or `${VAR}` in docker-compose);
nothing secret is written to the image, to the command line or to the auth config file:

  POSTGRES_USER, PGPASSWORD        database login (libpq reads PGPASSWORD itself, so the
                                   password never appears in a URI)
  POSTGRES_HOST / POSTGRES_PORT    default postgres / 5432
  POSTGRES_DB / POSTGRES_AUTH_DB   tracking and auth databases (default mlflow / mlflow_auth;
                                   the auth one is created when missing)
  MLFLOW_AUTH_ADMIN_USERNAME       admin created on first start (default admin)
  MLFLOW_AUTH_ADMIN_PASSWORD       its password, at least 12 characters (read by MLflow itself)
  MLFLOW_AUTH_DEFAULT_PERMISSION   what every user may do on others' experiments (default READ)
  MLFLOW_ARTIFACTS_DESTINATION     e.g. s3://mlflow-artifacts
  MLFLOW_S3_ENDPOINT_URL           MinIO's URL; unset for AWS S3. With it the bucket is
                                   created when missing
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   artifact store credentials (or an IAM role)
  MLFLOW_SERVER_ALLOWED_HOSTS      Host headers the server accepts (MLflow's own setting;
                                   default localhost and private IPs)

The generated auth config (``MLFLOW_AUTH_CONFIG_PATH``) holds no password: MLflow reads
``MLFLOW_AUTH_ADMIN_PASSWORD`` from the environment.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping

PORT = "5000"
REQUIRED = ("POSTGRES_USER", "PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_ARTIFACTS_DESTINATION")


def missing(env: Mapping[str, str]) -> list[str]:
    """Names of required variables that are unset or empty."""
    return [name for name in REQUIRED if not env.get(name)]


def postgres_uri(env: Mapping[str, str], database: str) -> str:
    """SQLAlchemy URI without a password (libpq takes it from PGPASSWORD)."""
    user = urllib.parse.quote(env["POSTGRES_USER"], safe="")
    host = env.get("POSTGRES_HOST", "postgres")
    port = env.get("POSTGRES_PORT", "5432")
    return f"postgresql://{user}@{host}:{port}/{urllib.parse.quote(database, safe='')}"


def auth_ini(env: Mapping[str, str]) -> str:
    """The basic-auth config file: keys of mlflow/server/auth/basic_auth.ini, no password.
    MLflow reads it with configparser's interpolation, so a literal "%" is written "%%"."""
    values = {
        "default_permission": env.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ"),
        "database_uri": postgres_uri(env, env.get("POSTGRES_AUTH_DB", "mlflow_auth")),
        "admin_username": env.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    lines = [f"{key} = {value.replace('%', '%%')}" for key, value in values.items()]
    return "\n".join(["[mlflow]", *lines, ""])


def server_command(env: Mapping[str, str]) -> list[str]:
    """The `mlflow server` command line (holds no secret: it is visible in `ps`)."""
    return ["mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", postgres_uri(env, env.get("POSTGRES_DB", "mlflow")),
            "--artifacts-destination", env["MLFLOW_ARTIFACTS_DESTINATION"],
            "--serve-artifacts", "--host", "0.0.0.0", "--port", PORT]


def _retry(what: str, fn, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the service may still be starting
            if time.monotonic() > deadline:
                raise SystemExit(f"entrypoint: {what} failed: {exc}") from None
            print(f"entrypoint: waiting for {what} ({exc.__class__.__name__})", flush=True)
            time.sleep(3)


def ensure_auth_database(env: Mapping[str, str]) -> None:
    """Create the auth database next to the tracking one when it does not exist."""
    import psycopg2

    name = env.get("POSTGRES_AUTH_DB", "mlflow_auth")

    def create() -> None:
        conn = psycopg2.connect(host=env.get("POSTGRES_HOST", "postgres"),
                                port=env.get("POSTGRES_PORT", "5432"),
                                user=env["POSTGRES_USER"],
                                dbname=env.get("POSTGRES_DB", "mlflow"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    _retry("PostgreSQL", create)


def ensure_bucket(env: Mapping[str, str]) -> None:
    """With MinIO (MLFLOW_S3_ENDPOINT_URL set), create the artifact bucket when missing."""
    endpoint = env.get("MLFLOW_S3_ENDPOINT_URL")
    dest = urllib.parse.urlparse(env["MLFLOW_ARTIFACTS_DESTINATION"])
    if not endpoint or dest.scheme != "s3":
        return
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=endpoint)

    def create() -> None:
        try:
            s3.head_bucket(Bucket=dest.netloc)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=dest.netloc)

    _retry("the artifact store", create)


def main() -> None:
    env = dict(os.environ)
    if names := missing(env):
        raise SystemExit(f"entrypoint: set {', '.join(names)} (from a secret, never a file)")
    ensure_auth_database(env)
    ensure_bucket(env)
    folder = tempfile.mkdtemp(prefix="mlflow-auth-")  # mode 700
    path = os.path.join(folder, "basic_auth.ini")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(auth_ini(env))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = path
    cmd = server_command(env)
    print("entrypoint: " + " ".join(cmd), flush=True)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
