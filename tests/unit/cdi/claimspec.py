"""Build a realistic claim spec (full GPU + MIG device) from a fake driver root, for several tests."""

from __future__ import annotations

from cdi.edits import common_edits, gpu_edits, mig_edits
from cdi.names import KIND, device_name
from cdi.spec import Device, Spec, new_spec
from tests.ground.driverroot import FakeDriverRoot

MIG_DEVICE = "gpu-1-mig-1g5gb-19-0"


def build_claim_spec(fake: FakeDriverRoot, uid: str) -> Spec:
    fake.add_mig_caps(1, 11, 0)
    common = common_edits(fake.root, fake.root, str(fake.hook_path))
    devices = [
        Device(device_name(uid, "gpu-0"), gpu_edits(fake.root, 0)),
        Device(device_name(uid, MIG_DEVICE), mig_edits(fake.root, fake.proc_dir, 1, 11, 0)),
    ]
    return new_spec(KIND, devices, common)
