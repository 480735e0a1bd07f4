"""VoxelMap: running-mean fusion, hit counts, the memory ceiling with eviction, PLY round trip."""
import numpy as np
import pytest

from vggt4d_ros.geometry.voxel import VoxelMap, pack_voxel_keys, read_ply, unpack_voxel_keys


def test_pack_unpack_keys_roundtrip():
    ijk = np.array([[0, 0, 0], [-1, 5, -(1 << 20)], [(1 << 20) - 1, -7, 3]])
    np.testing.assert_array_equal(unpack_voxel_keys(pack_voxel_keys(ijk)), ijk)


def test_running_mean_position_colour_and_counts():
    vm = VoxelMap(voxel_size=1.0, max_voxels=100)
    vm.insert(np.array([[0.2, 0.2, 0.2], [0.4, 0.4, 0.4], [5.5, 0.5, 0.5]]),
              np.array([[0, 0, 0], [100, 100, 100], [255, 0, 0]], np.uint8),
              np.array([1.0, 3.0, 2.0]))
    vm.insert(np.array([[0.6, 0.6, 0.6]]), np.array([[200, 200, 200]], np.uint8))
    arr = vm.to_arrays()
    assert len(vm) == 2
    order = np.argsort(arr["points"][:, 0])
    np.testing.assert_allclose(arr["points"][order[0]], [0.4, 0.4, 0.4], atol=1e-6)
    np.testing.assert_array_equal(arr["colors"][order[0]], [100, 100, 100])
    np.testing.assert_array_equal(arr["counts"][order], [3, 1])
    np.testing.assert_allclose(arr["confidence"][order], [5.0 / 3.0, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(arr["colors"][order[1]], [255, 0, 0])


def test_nonfinite_points_are_ignored_and_bad_shapes_raise():
    vm = VoxelMap(0.1, 10)
    vm.insert(np.array([[np.nan, 0, 0], [np.inf, 1, 1], [0.05, 0.05, 0.05]]))
    assert len(vm) == 1
    with pytest.raises(ValueError):
        vm.insert(np.zeros((3, 2)))
    with pytest.raises(ValueError):
        VoxelMap(voxel_size=0.0)
    with pytest.raises(ValueError):
        VoxelMap(max_voxels=0)


def test_ceiling_evicts_oldest_then_farthest_and_memory_is_bounded():
    vm = VoxelMap(voxel_size=1.0, max_voxels=50)
    rng = np.random.default_rng(0)
    # old region near the origin, then a sweep of new regions along +x
    vm.insert(rng.uniform(0, 5, size=(500, 3)))
    first_keys = set(map(tuple, np.floor(vm.to_arrays()["points"]).astype(int)))
    for step in range(1, 30):
        cam = np.array([10.0 * step, 0, 0])
        vm.insert(cam + rng.uniform(0, 3, size=(200, 3)), camera_position=cam)
        assert len(vm) <= 50
    arr = vm.to_arrays()
    # the latest insert survives entirely (27 voxels of a 3x3x3 block) and the oldest data is gone
    assert (arr["last_update"] == arr["last_update"].max()).sum() == 27
    assert not first_keys & set(map(tuple, np.floor(arr["points"]).astype(int)))
    assert vm.evicted_total > 0
    assert vm.nbytes <= 50 * 84  # capped at max_voxels rows of 84 bytes (index + storage)


def test_single_insert_larger_than_ceiling_keeps_nearest():
    vm = VoxelMap(voxel_size=1.0, max_voxels=10)
    pts = np.c_[np.arange(100) + 0.5, np.zeros(100), np.zeros(100)]
    vm.insert(pts, camera_position=np.zeros(3))
    arr = vm.to_arrays()
    assert len(vm) == 10
    np.testing.assert_allclose(np.sort(arr["points"][:, 0]), np.arange(10) + 0.5)


def test_eviction_without_camera_prefers_fewest_hits():
    vm = VoxelMap(voxel_size=1.0, max_voxels=3)
    vm.insert(np.array([[0.5, 0, 0], [0.5, 0, 0], [1.5, 0, 0], [2.5, 0, 0], [2.5, 0, 0]]))
    vm.insert(np.array([[10.5, 0, 0]]))
    xs = np.sort(vm.to_arrays()["points"][:, 0])
    np.testing.assert_allclose(xs, [0.5, 2.5, 10.5])


def test_ply_roundtrip(tmp_path):
    vm = VoxelMap(voxel_size=0.5, max_voxels=1000)
    rng = np.random.default_rng(1)
    vm.insert(rng.normal(size=(300, 3)), rng.integers(0, 256, size=(300, 3)).astype(np.uint8))
    path = vm.save_ply(tmp_path / "map.ply")
    header = path.read_bytes()[:400].split(b"end_header")[0].decode()
    for line in ("binary_little_endian", "property uchar red", "property uint count"):
        assert line in header
    back = read_ply(path)
    arr = vm.to_arrays()
    np.testing.assert_array_equal(back["points"], arr["points"])
    np.testing.assert_array_equal(back["colors"], arr["colors"])
    np.testing.assert_array_equal(back["counts"], arr["counts"])
    assert back["counts"].sum() == 300


def test_eviction_equals_the_stable_lexsort_rule_with_ties():
    """The O(n) eviction picks exactly the voxels a stable lexsort by (tick, secondary,
    storage order) puts first, with many ties in tick and in the secondary key."""
    rng = np.random.default_rng(5)
    for trial, cam in enumerate((None, np.array([0.3, -0.2, 0.1]))):
        vm = VoxelMap(voxel_size=1.0, max_voxels=10_000)
        for t in range(6):                                   # several ticks, repeated hits
            pts = rng.integers(-20, 20, size=(800, 3)).astype(np.float64) + 0.5
            vm.insert(pts)
        n = len(vm)
        slot = vm._slot[:n]                                  # key order, as the rule says
        ticks, counts = vm._last_tick[slot], vm._count[slot]
        if cam is None:
            secondary = counts.astype(np.float64)
        else:
            centre = vm._sum_xyz[slot] / counts[:, None]
            secondary = -np.linalg.norm(centre - cam, axis=1)
        for n_evict in (1, 37, n // 3, n - 1, n):
            want = np.lexsort((secondary, ticks))[:n_evict]
            got = vm._victims(n_evict, cam)
            assert np.array_equal(np.sort(got), np.sort(want)), (trial, n_evict)


def _reference_map(inserts, voxel_size, max_voxels):
    """The documented rule in plain Python (dict per voxel; evict oldest tick, then farthest
    from the camera, then storage order; an insert that alone overflows keeps its nearest
    new voxels) - the reference for the vectorised VoxelMap."""
    vox, order = {}, []                                    # key -> [sum xyz, n, tick]
    for tick, (pts, cam) in enumerate(inserts, start=1):
        keys = [tuple(np.floor(p / voxel_size).astype(int)) for p in pts]
        add = {}
        for k, p in zip(keys, pts):
            s = add.setdefault(k, [np.zeros(3), 0])
            s[0] = s[0] + p
            s[1] += 1
        fresh = [k for k in sorted(add) if k not in vox]
        for k in add:
            if k in vox:
                vox[k][0] = vox[k][0] + add[k][0]
                vox[k][1] += add[k][1]
                vox[k][2] = tick
        overflow = len(vox) + len(fresh) - max_voxels
        if overflow > 0:
            def rank(k):
                c = vox[k][0] / vox[k][1]
                return (vox[k][2], -np.linalg.norm(c - cam), order.index(k))
            for k in sorted(vox, key=rank)[:min(overflow, len(vox))]:
                del vox[k]
                order.remove(k)
            room = max_voxels - len(vox)
            if len(fresh) > room:
                fresh = sorted(fresh, key=lambda k: np.linalg.norm(
                    add[k][0] / add[k][1] - cam))[:room]
        for k in fresh:
            vox[k] = [add[k][0], add[k][1], tick]
        order = sorted(vox)                                # storage order = key order
    return {k: (v[0] / v[1], v[1]) for k, v in vox.items()}


@pytest.mark.parametrize("max_voxels,per_insert,extent", [(60, 40, 6), (1500, 1000, 30)])
def test_voxel_map_equals_the_plain_python_rule_through_evictions(max_voxels, per_insert,
                                                                   extent):
    """Random inserts into a map that overflows again and again (evicted slots reused, an
    insert alone overflowing; in the larger case the storage also grows past its initial 1024
    rows while evicting): the same voxels, means and counts as the plain rule."""
    rng = np.random.default_rng(8)
    inserts = []
    for t in range(8):
        n = per_insert if t != 5 else 5 * max_voxels        # insert 5 alone overflows
        pts = rng.integers(-extent, extent, size=(n, 3)) + rng.random((n, 3))
        inserts.append((pts, rng.normal(size=3) * 3))
    vm = VoxelMap(voxel_size=1.0, max_voxels=max_voxels)
    for i, (pts, cam) in enumerate(inserts):                # the state after EVERY insert
        vm.insert(pts, camera_position=cam)
        want = _reference_map(inserts[:i + 1], 1.0, max_voxels)
        arr = vm.to_arrays()
        got_keys = [tuple(k) for k in np.floor(arr["points"]).astype(int)]
        assert sorted(got_keys) == sorted(want) and len(vm) <= max_voxels, i
        for k, p, c in zip(got_keys, arr["points"], arr["counts"]):
            np.testing.assert_allclose(p, want[k][0], atol=1e-5)
            assert c == want[k][1]
