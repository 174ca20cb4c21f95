"""realm.kernels: filled in by later roadmap issues."""
