"""The cloth simulator: stable, on the table, deterministic; the gripper picks, carries, drops."""
import numpy as np
import pytest

from rko_ros.errors import ConfigError
from rko_ros.sim.cloth import ClothConfig, ClothSim


def _random_manipulation(sim, rng, ticks):
    """Aggressive random gripper use: targets anywhere in (and beyond) the workspace, grasps and
    releases at random, so the cloth gets dragged, lifted, dropped and piled."""
    for tick in range(ticks):
        if tick % 8 == 0:
            target = rng.uniform(-0.5, 0.5, 2)
            if rng.random() < 0.5:  # go to a particle so grasps actually happen
                target = sim.x[rng.integers(sim.n_particles), :2]
            closed = rng.random() < 0.6
        sim.command(target, closed)
        sim.advance(0.1)
        yield tick


def test_no_explosion_and_stays_on_table_over_many_steps():
    sim = ClothSim()
    cfg = sim.config
    rng = np.random.default_rng(0)
    s = cfg.spacing_m
    stretch = sim.edge_kinds == 0
    max_stretch = 0.0
    ticks = 200  # x 6 substeps = 1200 physics steps
    for _ in _random_manipulation(sim, rng, ticks):
        assert np.all(np.isfinite(sim.x)) and np.all(np.isfinite(sim.v))
        lengths = sim.edge_lengths_m()
        max_stretch = max(max_stretch, lengths[stretch].max() / s)
        # Every constraint, even bending (rest 2 s), stays within a bounded length.
        assert lengths.max() < 3.0 * s
        assert np.all(np.abs(sim.x[:, :2]) <= cfg.table_half_m + 1e-9)
        assert sim.x[:, 2].min() >= 0.0
        assert sim.x[:, 2].max() <= cfg.lift_height_m + cfg.side_m
    # Dragging at full gripper speed against table friction stretches the cloth some (few solver
    # iterations); an explosion would be many times the rest length.
    assert max_stretch < 2.0, f'stretch edges reached {max_stretch:.2f}x their rest length'
    # Released and left alone, the cloth comes to rest on the table.
    sim.command(sim.gripper[:2], False)
    for _ in range(50):
        sim.advance(0.1)
    settled = sim.positions
    for _ in range(10):
        sim.advance(0.1)
    assert np.abs(sim.x - settled).max() < 0.003
    assert sim.x[:, 2].max() < 8 * cfg.thickness_m   # a pile of a few layers, nothing floating


def test_random_run_actually_grasps_and_lifts():
    sim = ClothSim()
    rng = np.random.default_rng(0)
    grasped_ticks, max_z = 0, 0.0
    for _ in _random_manipulation(sim, rng, 80):
        grasped_ticks += sim.grasped >= 0
        max_z = max(max_z, sim.x[:, 2].max())
    assert grasped_ticks > 10
    assert max_z > 0.5 * sim.config.lift_height_m


def test_dragging_to_the_workspace_corner_keeps_cloth_on_table():
    sim = ClothSim()
    corner = sim.corner_indices()[3]
    sim.command(sim.x[corner, :2], False)
    for _ in range(10):
        sim.advance(0.1)
    sim.command(sim.x[corner, :2], True)
    assert sim.grasped == corner
    sim.command((0.3, 0.3), True)
    for _ in range(20):
        sim.advance(0.1)
    half = sim.config.table_half_m
    assert np.all(np.abs(sim.x[:, :2]) <= half)
    assert np.allclose(sim.x[corner], sim.gripper)
    assert sim.gripper[2] == pytest.approx(sim.config.lift_height_m)


def test_flat_cloth_at_rest_does_not_drift():
    sim = ClothSim()
    before = sim.positions
    for _ in range(30):
        sim.advance(0.1)
    assert np.abs(sim.x - before).max() < 1e-3


def test_same_commands_give_identical_states():
    runs = []
    for _ in range(2):
        sim = ClothSim()
        sim.reset(center_xy=(0.01, -0.02), angle_rad=0.05)
        for _ in _random_manipulation(sim, np.random.default_rng(3), 40):
            pass
        runs.append((sim.positions, sim.gripper.copy(), sim.grasped))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]


def test_grasp_picks_nearest_particle_within_radius_only():
    sim = ClothSim()
    target = sim.index(5, 0)
    sim.reset(gripper_xy=sim.x[target, :2] + [0.004, 0.003])
    sim.command(sim.gripper[:2], True)
    assert sim.grasped == target
    sim.command(sim.gripper[:2], False)
    assert sim.grasped == -1
    far = sim.x[:, :2].min(axis=0) - 2 * sim.config.pick_radius_m
    sim.reset(gripper_xy=far)
    sim.command(far, True)
    assert sim.grasped == -1 and sim.gripper_closed


def test_released_corner_falls_back_onto_the_table():
    sim = ClothSim()
    corner = sim.corner_indices()[0]
    sim.reset(gripper_xy=sim.x[corner, :2])
    sim.command(sim.gripper[:2], True)
    for _ in range(5):
        sim.advance(0.1)
    assert sim.x[corner, 2] == pytest.approx(sim.config.lift_height_m)
    sim.command(sim.gripper[:2], False)
    for _ in range(10):
        sim.advance(0.1)
    assert sim.x[corner, 2] < 0.01


def test_fold_puts_one_layer_above_the_other():
    sim = ClothSim()
    grasp, partner = sim.index(5, 0), sim.index(5, 10)
    sim.reset(gripper_xy=sim.x[grasp, :2])
    sim.command(sim.gripper[:2], True)
    sim.advance(0.3)
    goal = sim.x[partner, :2] - [0.02, 0.0]
    start = sim.x[grasp, :2].copy()
    stretch = sim.edge_kinds == 0
    max_stretch = 0.0
    for k in range(1, 16):
        sim.command(start + (goal - start) * min(1.0, k / 12), True)
        sim.advance(0.1)
        max_stretch = max(max_stretch, sim.edge_lengths_m()[stretch].max() / sim.config.spacing_m)
    sim.command(goal, False)
    for _ in range(15):
        sim.advance(0.1)
    # At a demonstrator's pace the cloth stretches little.
    assert max_stretch < 1.3
    left = sim.grid_rc[:, 1] <= 2
    right_partner = sim.grid_rc[left][:, 0] * sim.n + (10 - sim.grid_rc[left][:, 1])
    # The moved half lies over the other half, one thickness up.
    assert np.mean(sim.x[left, 2] > sim.x[right_partner, 2]) > 0.9
    assert np.median(sim.x[left, 2]) >= 0.8 * sim.config.thickness_m


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match='grid_n'):
        ClothConfig(grid_n=2)
    with pytest.raises(ConfigError, match='bend_stiffness'):
        ClothConfig(bend_stiffness=1.5)
    with pytest.raises(ValueError, match='not finite'):
        ClothSim().command((np.nan, 0.0), False)
