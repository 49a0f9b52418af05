"""Gridwalk: moves, slips, the expert from every cell, and the covariate shift it is built for."""

import pytest

from relaxrl.envs.episodes import ExpertTeacher, label_samples, run_episodes, trajectory_sample
from relaxrl.envs.gridwalk import MOVES, GridWalkEnv, cell_name, expert_move, offset_text
from relaxrl.envs.registry import make_env
from relaxrl.models.tiny import build_tokenizer


def play(env, seed, policy):
    """Plays ``policy(env) -> action`` to the end; returns (success, moves, cells visited)."""
    env.reset(seed)
    cells = [env.cell]
    for turn in range(1, env.max_turns + 1):
        r = env.step(policy(env))
        cells.append(env.cell)
        if r.done:
            return r.info["success"], turn, cells
    raise AssertionError("episode did not end within max_turns")


def _goal_of(seed):
    env = GridWalkEnv()
    env.reset(seed)
    return env.goal


def expert(env):
    return env.expert_action()


def down_right_only(env):
    """What demonstrations from a0 teach: down to the goal's row, then right; never up or left."""
    return "d" if env.cell[0] < env.goal[0] else "r"


@pytest.mark.parametrize("seed", range(30))
def test_without_slips_the_expert_walks_rows_then_columns_to_the_goal(seed):
    env = GridWalkEnv(slip=0.0)
    obs = env.reset(seed)
    goal = env.goal
    assert obs == f"a0>{cell_name(goal)}" and goal != (0, 0)
    moves = []
    while not env.done:
        moves.append(env.expert_action())
        r = env.step(moves[-1])
    assert r.reward == 1.0 and r.info["success"] and r.observation == "goal"
    assert moves == ["d"] * goal[0] + ["r"] * goal[1]  # from a0: only down and right


def test_the_expert_reaches_the_goal_from_every_cell_in_manhattan_distance():
    env = GridWalkEnv(size=6, slip=0.0, max_turns=10)
    env.reset(0)
    for r in range(6):
        for c in range(6):
            if (r, c) == env.goal:
                continue
            env.cell, env.turns, env.done = (r, c), 0, False
            steps = 0
            while not env.done:
                env.step(env.expert_action())
                steps += 1
            assert env.cell == env.goal and steps == abs(r - env.goal[0]) + abs(c - env.goal[1]), (r, c)
    # Below or right of the goal the expert moves up or left: labels demonstrations from a0 never hold.
    assert expert_move((5, 0), (2, 3)) == "u" and expert_move((2, 5), (2, 3)) == "l"
    with pytest.raises(ValueError, match="at the goal"):
        expert_move((2, 3), (2, 3))


def test_edges_keep_the_agent_and_invalid_actions_cost_a_turn():
    env = GridWalkEnv(size=4, slip=0.0, max_turns=3)
    env.reset(0)
    r = env.step("u")  # off the top edge from a0
    assert env.cell == (0, 0) and r.observation == f"a0>{cell_name(env.goal)}" and not r.info["invalid"]
    r = env.step("north")
    assert r.observation == f"udlr? a0>{cell_name(env.goal)}" and r.info["invalid"] and not r.done
    r = env.step("l")
    assert r.done and r.reward == 0.0  # out of turns
    with pytest.raises(RuntimeError, match="reset"):
        env.step("d")


def test_slips_move_elsewhere_and_follow_the_seed_not_the_actions():
    # With slip 0.99 nearly every move goes in one of the other three directions.
    env = GridWalkEnv(size=8, slip=0.99, max_turns=50)
    env.reset(5)
    env.cell = (4, 4)
    for move in "udlr" * 5:
        before = env.cell
        r = env.step(move)
        if r.done:
            break
        if r.info["slipped"]:
            dr, dc = MOVES[move]
            assert env.cell != (before[0] + dr, before[1] + dc)
    # The same seed gives the same slips whatever was played (two draws per turn, invalid turns too).
    flags = []
    for moves in ("d?drrd", "rrrddr"):
        env = GridWalkEnv(slip=0.5, max_turns=10)
        env.reset(11)
        env.goal = (5, 5)  # far away: the episode runs all six moves
        flags.append([env.step(m).info["slipped"] for m in moves])
    assert flags[0][2:] == flags[1][2:] and 0 < sum(flags[1]) < 6, flags


def test_with_slips_demonstrations_already_hold_recovery_labels():
    """Why the bench runs slip=0: with slip 0.3 the expert's own trajectories from a0 are pushed off
    its path too, so 7% of its labels are up or left (recovery data behaviour cloning gets for free);
    a policy that never moves up or left still fails where the expert recovers."""
    seeds = range(400)
    expert_wins = sum(play(GridWalkEnv(slip=0.3), s, expert)[0] for s in seeds)
    blind_wins = sum(play(GridWalkEnv(slip=0.3), s, down_right_only)[0] for s in seeds)
    # Measured: the expert 0.968, down-and-right only 0.808 (size 6, slip 0.3, 20 turns).
    assert expert_wins / 400 >= 0.93 and blind_wins / 400 <= 0.85, (expert_wins, blind_wins)
    labels, states = [], set()
    for s in seeds:
        env = GridWalkEnv(slip=0.3)
        env.reset(s)
        while not env.done:
            labels.append(env.expert_action())
            states.add((env.cell, env.goal))
            env.step(labels[-1])
    up_left = sum(a in "ul" for a in labels) / len(labels)
    assert 0.0 < up_left < 0.12, up_left  # measured 0.073
    # Measured: 456 of the 1,260 (cell, goal) states in 400 episodes, 3,408 labels.
    assert len(states) < 0.45 * 36 * 35, len(states)


def test_without_slips_the_students_own_wrong_moves_are_what_leaves_the_expert_states():
    """The bench's setting (slip 0, Ross et al.'s conditions): the expert's walks from a0 are the same
    35 walks over and over, on 180 of the 1,260 (cell, goal) states, so they hold no state off
    them; most single wrong moves from them (3 in 5) land off them, and the expert knows the way
    from every cell (the test above)."""
    states, labels = set(), 0
    for s in range(400):
        env = GridWalkEnv(slip=0.0)
        env.reset(s)
        while not env.done:
            states.add((env.cell, env.goal))
            labels += 1
            env.step(env.expert_action())
    assert len(states) == 180 and labels > 2000  # 14% of the states however many demonstrations
    off = moves = 0
    for cell, goal in states:
        for m, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if m == expert_move(cell, goal) or not (0 <= nxt[0] < 6 and 0 <= nxt[1] < 6):
                continue
            moves += 1
            off += nxt != goal and (nxt, goal) not in states
    assert off / moves == pytest.approx(215 / 360)


def test_registry_builds_it_and_expert_episodes_make_one_letter_labels():
    import asyncio

    env = make_env(name="gridwalk", size=5, slip=0.1)
    assert isinstance(env, GridWalkEnv) and env.size == 5
    tok = build_tokenizer()
    (ep,) = asyncio.run(run_episodes(lambda: GridWalkEnv(slip=0.0), [3], tokenizer=tok, student=None,
                                     teacher=ExpertTeacher(), beta=1.0))
    assert ep.success and all(t.action in ("d", "r") for t in ep.turns)
    labels = label_samples(ep, tok)
    assert [tok.decode(s.response_ids) for s in labels] == [t.action + "<eos>" for t in ep.turns]
    traj = trajectory_sample(ep)
    text = tok.decode(traj.prompt_ids + traj.response_ids)
    goal = cell_name(_goal_of(3))
    assert text.startswith(f"<|user|>a0>{goal}<|assistant|>") and text.count("<|assistant|>") == len(ep.turns)
    assert sum(traj.loss_mask) == 0  # teacher-only: no student tokens to train by outcome


def test_offset_observations_have_a_minus_sign_only_past_the_goal():
    """obs=offset: the goal's signed offset; the expert's own walks from a0 never show a '-', the
    states past the goal's row or column (where up or left is the label) always do."""
    assert offset_text((0, 0), (2, 3)) == "+2+3" and offset_text((3, 1), (2, 3)) == "-1+2"
    for seed in range(30):
        env = GridWalkEnv(slip=0.0, obs="offset")
        seen = [env.reset(seed)]
        while not env.done:
            seen.append(env.step(env.expert_action()).observation)
        assert seen[0] == offset_text((0, 0), env.goal) and seen[-1] == "goal"
        assert not any("-" in o for o in seen), seen
    env = GridWalkEnv(slip=0.0, obs="offset")
    env.reset(0)
    env.goal = (2, 3)
    env.cell = (2, 1)
    assert env.step("d").observation == "-1+2" and env.expert_action() == "u"


@pytest.mark.parametrize("kwargs, match", [({"size": 11}, "size"), ({"slip": 1.0}, "slip"),
                                           ({"max_turns": 0}, "max_turns"), ({"obs": "pixels"}, "obs")])
def test_bad_config_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridWalkEnv(**kwargs)


def test_env_gridwalk_is_selectable_from_the_command_line_and_typed():
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["env=gridwalk", "algorithm=dagger", "env.slip=0.1"])
        with pytest.raises(ConfigCompositionException):
            compose(config_name="config", overrides=["env=gridwalk", "env.slipp=0.1"])
    env = make_env(**OmegaConf.to_container(cfg.env, resolve=True))
    assert (env.name, env.size, env.slip, env.max_turns) == ("gridwalk", 6, 0.1, 20)
