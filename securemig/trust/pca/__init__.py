"""The privacy CA: enrollment logic (core), its HTTPS service (web), its client."""
