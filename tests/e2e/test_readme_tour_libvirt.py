"""The README's libvirt tour, run as written (issue 19): the block between
``<!-- tour-libvirt:begin -->`` and ``<!-- tour-libvirt:end -->`` — an operator's existing
domain (a Debian 12 system booting from its own disk, a NIC on a libvirt network) made
by scripts/example-libvirt.sh, protected with a network map, test-failed-over, failed
over planned, reversed, failed back and reversed again, removed — with fresh homes and
ports (harness.tour) and the tour's libvirt names (the domain, both networks) made this
run's own: the system libvirtd may hold another run's. Whatever the tour leaves when it
fails is cleaned by the same script."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from harness.tour import REPO, Tour, run_tour

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1800)
def test_the_libvirt_tour_runs_as_written(request, fresh_dir):
    if os.geteuid() != 0:
        pytest.skip("the libvirt tour (virsh, the Debian guest build) needs root")
    request.getfixturevalue("libvirtd")
    tag = secrets.token_hex(3)
    names = {"shop1": f"shop1-{tag}", "office-lan": f"office-lan-{tag}",
             "dr-lan": f"dr-lan-{tag}"}
    tour = Tour("tour-libvirt", ("/srv/kvm-a", "/srv/kvm-b"), (8451, 8452, 8453, 8454),
                ("kvm-a", "kvm-b"), timeout=900, renames=names)
    try:
        run_tour(tour, fresh_dir)
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "example-libvirt.sh"), "clean",
                        names["shop1"], "--network", names["office-lan"], "--network",
                        names["dr-lan"]], capture_output=True, timeout=120)
