"""Pure-Python DICOM core of dicom-deid: tag paths, value casting, profiles, identity
mapping, modification, anonymization, split/merge planning, transcoding.

Nothing in this package imports Apache Beam except ``transforms.beam``.
"""

__version__ = "0.1.0"
PRODUCT = "dicom-deid"
