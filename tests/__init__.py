"""securemig tests (trial)."""
