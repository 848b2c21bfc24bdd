"""twistd plugin: ``twistd securemig`` runs a securemig destination."""

from twisted.application.service import ServiceMaker

securemig = ServiceMaker(
    "securemig",
    "securemig.app.service",
    "Destination of secure VM + vTPM migrations (see `securemig --help`).",
    "securemig",
)

securemig_pca = ServiceMaker(
    "securemig-pca",
    "securemig.app.pca_service",
    "Privacy CA of securemig: certifies TPM attestation keys of enrolled hosts.",
    "securemig-pca",
)
