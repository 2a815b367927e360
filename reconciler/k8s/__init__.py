"""Kubernetes-facing renders: CRDs, install manifests, injection. Pure."""
