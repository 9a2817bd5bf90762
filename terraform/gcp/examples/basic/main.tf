# A checkpoint bucket for training jobs on GKE (Workload Identity enabled on the
# cluster and node pool).
#
#   terraform init && terraform apply -var project_id=my-project -var bucket_name=my-team-checkpoints

terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.22"
    }
  }
}

variable "project_id" {
  description = "Project of the bucket and of the GKE cluster."
  type        = string
}

variable "bucket_name" {
  description = "Globally unique bucket name."
  type        = string
}

variable "location" {
  description = "Bucket location; use the region of the GPUs."
  type        = string
  default     = "us-central1"
}

provider "google" {
  project = var.project_id
}

module "checkpoints" {
  source = "../.."

  project_id  = var.project_id
  bucket_name = var.bucket_name
  location    = var.location
  prefix      = "checkpoints"

  # Pods in namespace "training" running as Kubernetes service account "trainer"
  # act as the module's Google service account.
  k8s_namespace       = "training"
  k8s_service_account = "trainer"

  labels = {
    app = "cloudckpt"
  }
}

output "checkpoint_root_url" {
  value = module.checkpoints.checkpoint_root_url
}

output "service_account_annotations" {
  value = module.checkpoints.service_account_annotations
}
