"""Change tracking: which extents of a VM's disks changed since the last acknowledged point.

`bitmap` (persistent dirty bitmaps read over NBD: what a cycle ships) and `scan` (hash
manifests compared block by block: what a resynchronization, a reverse or a failback
ships when there is no bitmap to trust); `factory` picks a tracker by name.

May import `hypervisor` (the block sessions it reads), `qemutools`, `domain`, `errors`.
"""
