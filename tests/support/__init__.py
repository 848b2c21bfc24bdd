"""Fixtures shared by the test modules.

A test module imports what it shares from here, never from another test
module: a test module is what it tests, and importing one from another ran
its set-up code (and, for a test case class, its tests) in the wrong place.
``tests/test_layers.py`` checks it.  Each module here is named for what it
provides:

- :mod:`tests.support.bundles`: digests of a bundle's images;
- :mod:`tests.support.memory`: a destination and a source joined in memory
  (``iosim``), a hand-driven peer;
- :mod:`tests.support.messages`: protocol messages for the sans-IO tests;
- :mod:`tests.support.commands`: ``securemig`` and ``twistd`` as processes,
  crash points;
- :mod:`tests.support.proxy`: a TCP forwarder that cuts at a chosen frame;
- :mod:`tests.support.relay`: a plain relay of QEMU's live stream;
- :mod:`tests.support.tpm`: the test process's shared swtpm;
- :mod:`tests.support.trust`: attestors, forged AKs, a PCA clock;
- :mod:`tests.support.secure`: two enrolled hosts and the secure tests' base;
- :mod:`tests.support.lab`: a lab per test, the base of the lab tests;
- :mod:`tests.support.qemu`: TCG, PCR 16 values and Linux-guest bundles;
- :mod:`tests.support.libvirt`: a libvirt secret sealed to the shared TPM.
"""
