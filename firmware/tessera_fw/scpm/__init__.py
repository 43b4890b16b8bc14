# SCPM device stack (ISO/IEC 24767-2 as profiled in docs/scpm-profile.md).
