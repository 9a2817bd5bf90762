output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the checkpoint bucket."
  value       = aws_s3_bucket.this.arn
}

output "policy_arn" {
  description = "ARN of the least-privilege IAM policy for the checkpoint prefix (attach it to other roles as needed)."
  value       = aws_iam_policy.checkpoint.arn
}

output "role_arn" {
  description = "ARN of the IRSA role (null when oidc_provider_arn is not set)."
  value       = local.create_role ? aws_iam_role.checkpoint[0].arn : null
}

output "service_account_annotations" {
  description = "Annotations for the Kubernetes service account that makes pods assume the IRSA role (empty without a role)."
  value       = local.create_role ? { "eks.amazonaws.com/role-arn" = aws_iam_role.checkpoint[0].arn } : {}
}

output "checkpoint_root_url" {
  description = "Checkpoint root to give cloudckpt (CheckpointManager / open_storage), s3://<bucket>/<prefix>."
  value       = "s3://${aws_s3_bucket.this.id}/${var.prefix}"
}
