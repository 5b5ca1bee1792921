"""Change tracking: which extents of a VM's disks changed since the last acknowledged point.

`bitmap` (persistent dirty bitmaps read over NBD) and, later, `scan` (hash manifests).
May import `qemutools`, `hypervisor.base`, `domain`, `errors`.
"""
