"""Gridwalk: moves, slips, the expert from every cell, and the covariate shift it is built for."""

import pytest

from relaxrl.envs.episodes import ExpertTeacher, label_samples, run_episodes, trajectory_sample
from relaxrl.envs.gridwalk import MOVES, GridWalkEnv, cell_name, expert_move
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


def test_covariate_shift_demonstrations_miss_the_states_a_slip_leads_to():
    """The property the DAgger bench needs: the expert's own trajectories from a0 rarely need up or
    left, a policy that never takes them (what those demonstrations teach) fails where the expert
    recovers, and the expert's trajectories visit few of the (cell, goal) states."""
    seeds = range(400)
    expert_wins = sum(play(GridWalkEnv(), s, expert)[0] for s in seeds)
    blind_wins = sum(play(GridWalkEnv(), s, down_right_only)[0] for s in seeds)
    # Measured: the expert 0.968, down-and-right only 0.808 (the defaults: size 6, slip 0.3, 20 turns).
    assert expert_wins / 400 >= 0.93 and blind_wins / 400 <= 0.85, (expert_wins, blind_wins)
    labels, states = [], set()
    for s in seeds:
        env = GridWalkEnv()
        env.reset(s)
        while not env.done:
            labels.append(env.expert_action())
            states.add((env.cell, env.goal))
            env.step(labels[-1])
    up_left = sum(a in "ul" for a in labels) / len(labels)
    assert 0.0 < up_left < 0.12, up_left  # measured 0.073
    # Measured: 456 of the 1,260 (cell, goal) states in 400 episodes, 3,408 labels.
    assert len(states) < 0.45 * 36 * 35, len(states)


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


@pytest.mark.parametrize("kwargs, match", [({"size": 11}, "size"), ({"slip": 1.0}, "slip"),
                                           ({"max_turns": 0}, "max_turns")])
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
