"""TPM 2.0: the operations securemig needs (tpm.py) and swtpm as a real part (swtpm.py)."""
