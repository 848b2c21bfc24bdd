"""securemig: move a VM and its virtual TPM to an attested host, and measure the cost."""

__version__ = "0.1.0"
