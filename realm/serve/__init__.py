"""realm.serve: filled in by later roadmap issues."""
