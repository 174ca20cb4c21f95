"""realm.runtime: filled in by later roadmap issues."""
