# A checkpoint bucket for training jobs on EKS.
#
#   terraform init && terraform apply \
#     -var bucket_name=my-team-checkpoints \
#     -var oidc_provider_arn=arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

variable "region" {
  description = "AWS region of the bucket (use the region of the EKS cluster)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Globally unique bucket name."
  type        = string
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the EKS cluster (aws eks describe-cluster ... identity.oidc.issuer, registered in IAM)."
  type        = string
}

provider "aws" {
  region = var.region
}

module "checkpoints" {
  source = "../.."

  bucket_name = var.bucket_name
  prefix      = "checkpoints"

  # Pods in namespace "training" running as service account "trainer" get the role.
  oidc_provider_arn   = var.oidc_provider_arn
  k8s_namespace       = "training"
  k8s_service_account = "trainer"

  tags = {
    app = "cloudckpt"
  }
}

output "checkpoint_root_url" {
  value = module.checkpoints.checkpoint_root_url
}

output "role_arn" {
  value = module.checkpoints.role_arn
}

output "service_account_annotations" {
  value = module.checkpoints.service_account_annotations
}
