"""The ``dicom-deid`` command and the pipelines it builds."""

# Exit statuses of every command (README "Exit status"); here so that the CLI, which must not
# import Beam or pyarrow before it needs them, and the pipelines share one definition.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
