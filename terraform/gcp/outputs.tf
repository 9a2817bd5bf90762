output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = google_storage_bucket.this.name
}

output "bucket_url" {
  description = "gs:// URL of the bucket."
  value       = google_storage_bucket.this.url
}

output "service_account_email" {
  description = "Email of the Google service account with access to the checkpoint prefix."
  value       = google_service_account.checkpoint.email
}

output "service_account_annotations" {
  description = "Annotations for the Kubernetes service account that make GKE pods act as the Google service account."
  value       = { "iam.gke.io/gcp-service-account" = google_service_account.checkpoint.email }
}

output "checkpoint_root_url" {
  description = "Checkpoint root to give cloudckpt (CheckpointManager / open_storage), gs://<bucket>/<prefix>."
  value       = "gs://${google_storage_bucket.this.name}/${var.prefix}"
}
