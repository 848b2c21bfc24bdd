"""Hypervisor backends (:mod:`.backends` chooses one) and the VM bundle."""
