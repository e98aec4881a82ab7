#!/bin/sh
# One-shot set-up of the S3-compatible store (the `s3-init` service, minio/mc image): the buckets, and
# the application's access key, limited to those buckets. Idempotent: safe to run at every `up`.
#   mlops-data        DVC remote (params.yaml version.remote = s3://mlops-data/dvc) and ingest sources
#   mlflow-artifacts  MLflow's artifact store (the tracking server writes there, clients go through it)
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${S3_ACCESS_KEY_ID:?}" "${S3_SECRET_ACCESS_KEY:?}"
endpoint="${S3_ENDPOINT:-http://s3:9000}"

mc alias set store "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
for bucket in mlops-data mlflow-artifacts; do
    mc mb --ignore-existing "store/$bucket"
done

policy=/tmp/mlops-rw.json
cat > "$policy" <<'JSON'
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::mlops-data", "arn:aws:s3:::mlflow-artifacts"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                 "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::mlops-data/*", "arn:aws:s3:::mlflow-artifacts/*"]
    }
  ]
}
JSON
mc admin policy create store mlops-rw "$policy"
mc admin user add store "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY"
if ! output=$(mc admin policy attach store mlops-rw --user "$S3_ACCESS_KEY_ID" 2>&1); then
    case "$output" in
        *already*) ;;  # attached by an earlier run
        *) echo "$output" >&2; exit 1 ;;
    esac
fi
echo "s3-init: buckets mlops-data and mlflow-artifacts ready; access key $S3_ACCESS_KEY_ID has policy mlops-rw"
