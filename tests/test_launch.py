"""Launchers: main.py with two CPU processes (DDP over gloo), main_distributed.py through submitit's local executor
(two tasks, and a real requeue after a timeout signal), error propagation and config errors at start-up."""
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import assert_same_weights, load, read_csv, tiny_params, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IJEPA_COLUMNS = ['epoch', 'itr', 'loss', 'mask-A', 'mask-B', 'time (ms)']


def run(script, *args, timeout=120, env_extra=None):
    """Run a launcher of this repository as a user would (from the repository, a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ddp_params(folder, **overrides):
    """Tiny run of 4 steps on each of two ranks; every rank writes its checkpoint and CSV."""
    return tiny_params(folder, **{'optimization.epochs': 1, 'optimization.max_steps': 4, 'logging.log_freq': 1,
                                  'logging.save_all_ranks': True, **overrides})


def missing_dataset_config(tmp_path):
    """A two-rank config whose image folder does not exist (main.py refuses it at start-up; submitted anyway by
    main_distributed.py, whose submitting machine need not have the data, every task fails)."""
    params = ddp_params(tmp_path / 'out', **{'data.dataset': 'imagefolder',
                                             'data.root_path': str(tmp_path / 'missing')})
    return write_config(tmp_path / 'cfg.yaml', params)


def unreadable_images_config(tmp_path):
    """A two-rank config whose images are not images: every process fails when it loads its first batch."""
    folder = tmp_path / 'imgs' / 'class_a'
    folder.mkdir(parents=True)
    for i in range(40):
        (folder / f'img{i}.png').write_bytes(b'not a png')
    params = ddp_params(tmp_path / 'out', **{'data.dataset': 'imagefolder', 'data.root_path': str(tmp_path),
                                             'data.image_folder': 'imgs'})
    return write_config(tmp_path / 'cfg.yaml', params)


def assert_two_ranks_trained(folder, steps=4):
    r0, r1 = load(folder / 'jepa-latest.pth.tar'), load(folder / 'jepa-latest_r1.pth.tar')
    assert_same_weights(r0, r1)
    assert r0['world_size'] == r1['world_size'] == 2
    assert r0['step'] == r1['step'] == steps
    losses = []
    for rank in (0, 1):
        header, rows = read_csv(folder / f'jepa_r{rank}.csv')
        assert header[:6] == IJEPA_COLUMNS
        assert [int(r['itr']) for r in rows] == list(range(steps))
        losses.append([float(r['loss']) for r in rows])
    # the logged loss is the mean over the ranks (as ijepa logs it): the same in both CSVs, though the ranks
    # trained on different images; the checkpoint's is its mean over the epoch's steps
    assert losses[0] == losses[1]
    assert r0['loss'] == pytest.approx(sum(losses[0]) / steps, abs=1e-4)
    return r0


@pytest.mark.timeout(90)
def test_main_two_cpu_processes_train_with_ddp(tmp_path):
    out = tmp_path / 'out'
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(out))
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', 'cpu')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = assert_two_ranks_trained(out)

    # training happened: the weights moved (a little) away from the initial ones of the same seed
    from src.helper import init_model
    torch.manual_seed(0)
    encoder, predictor = init_model(device='cpu', patch_size=8, model_name='vit_pico', crop_size=32, pred_depth=2,
                                    pred_emb_dim=16)
    for key, model in (('encoder', encoder), ('predictor', predictor)):
        for name, initial in model.state_dict().items():
            if name.endswith('pos_embed'):         # fixed sin-cos table
                continue
            delta = (ckpt[key][name] - initial).abs().max().item()
            assert delta < 0.02, f'{key}.{name}: not the initial weights of this seed (max diff {delta})'
        assert any(not torch.equal(ckpt[key][n], v) for n, v in model.state_dict().items()), f'{key} unchanged'


@pytest.mark.timeout(90)
@pytest.mark.parametrize('prediction', ['sequential', 'chained'])
def test_main_two_cpu_processes_train_dseq_with_ddp(tmp_path, prediction):
    """DSeq-JEPA's variable-size steps under DDP (several encoder/predictor calls per step: length buckets on an
    8x8 grid with random-box regions, and chained mode's steps): ranks agree."""
    out = tmp_path / 'out'
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(out, **{
        'meta.method': 'dseq', 'meta.use_cls_token': True, 'dseq.prediction': prediction, 'dseq.lambda_start': 0.0,
        'data.crop_size': 64}))
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', 'cpu')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_two_ranks_trained(out)


@pytest.mark.timeout(90)
def test_main_single_process_ignores_inherited_cluster_variables(tmp_path):
    """Inside a SLURM job step of 2 tasks or a torchrun shell, `main.py --devices cpu` is still one process: it
    must not wait for a second rank."""
    out = tmp_path / 'out'
    fname = write_config(tmp_path / 'cfg.yaml', tiny_params(out, **{'optimization.max_steps': 2}))
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', timeout=80, env_extra={
        'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'RANK': '0', 'WORLD_SIZE': '2'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load(out / 'jepa-latest.pth.tar')['world_size'] == 1


def proc_state(pid):
    """(state, parent pid) of process `pid` from /proc, or None if it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()          # after "pid (comm)": state, ppid, ...
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid):
    state = proc_state(pid)
    return state is not None and state[0] != 'Z'                   # a zombie has ended


def children(pid):
    """Pids of the live processes whose parent is `pid`."""
    return [int(p) for p in os.listdir('/proc')
            if p.isdigit() and (s := proc_state(p)) is not None and s[1] == pid and s[0] != 'Z']


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.timeout(120)
def test_main_processes_end_with_the_launcher(tmp_path):
    """SIGTERM to the launcher of a background run (`kill`, a scheduler) ends its training processes too: none goes on
    training unsupervised into the same folder."""
    import signal
    out = tmp_path / 'out'
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(out, **{'optimization.epochs': 1000,
                                                                    'optimization.max_steps': None}))
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    # started as a shell starts a background job (`main.py ... &`, nohup): SIGINT ignored, which its processes
    # inherit, so torch's forwarding of the launcher's SIGTERM to them as SIGINT does not stop them
    launcher = subprocess.Popen([sys.executable, os.path.join(REPO, 'main.py'), '--fname', fname, '--devices',
                                 'cpu', 'cpu'], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    ranks = []
    try:
        deadline = time.time() + 90
        while not all((out / f'jepa_r{r}.csv').exists() for r in (0, 1)):   # both ranks are training
            assert launcher.poll() is None and time.time() < deadline, 'the run did not start'
            time.sleep(0.5)
        ranks = children(launcher.pid)
        assert len(ranks) >= 2
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        deadline = time.time() + 20
        while any(alive(p) for p in ranks) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in ranks), 'training processes outlived the launcher'
    finally:
        launcher.kill()
        for p in ranks + children(launcher.pid):
            if alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_main_error_in_a_process_stops_the_run(tmp_path):
    fname = unreadable_images_config(tmp_path)
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', 'cpu', timeout=80)
    assert proc.returncode != 0
    assert 'cannot read image' in proc.stderr and 'img' in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(90)
def test_main_distributed_local_executor_two_tasks(tmp_path):
    out, logs = tmp_path / 'out', tmp_path / 'submitit'
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(out))
    proc = run('main_distributed.py', '--fname', fname, '--folder', logs, '--cluster', 'local', '--nodes', 1,
               '--tasks-per-node', 2, '--gpus-per-node', 0, '--time', 5, '--wait', timeout=85)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.split()[0]
    assert (logs / f'job_{job_id}').is_dir(), f'no submitit folder for job {job_id!r}: {os.listdir(logs)}'
    assert_two_ranks_trained(out)


@pytest.mark.timeout(60)
def test_main_distributed_wait_reports_a_failed_job(tmp_path):
    fname = missing_dataset_config(tmp_path)
    proc = run('main_distributed.py', '--fname', fname, '--folder', tmp_path / 'submitit', '--cluster', 'local',
               '--tasks-per-node', 2, '--gpus-per-node', 0, '--time', 3, '--wait', timeout=55)
    assert proc.returncode != 0
    assert 'warning' in proc.stderr and 'data.root_path' in proc.stderr     # said before submitting
    assert 'failed' in proc.stderr and 'image folder not found' in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(10)
def test_trainer_checkpoint_requeues_a_resuming_trainer(tmp_path):
    import submitit

    from main_distributed import Trainer
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(tmp_path / 'out'))
    trainer = Trainer(fname)
    assert trainer.resume is False and trainer.fname == fname
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, Trainer)
    assert delayed.function.resume is True and delayed.function.fname == fname
    assert delayed.args == () and delayed.kwargs == {}
    # submitit pickles it for the requeued job
    delayed.dump(tmp_path / 'requeued.pkl')
    again = submitit.helpers.DelayedSubmission.load(tmp_path / 'requeued.pkl')
    assert again.function.resume is True and again.function.fname == fname
    assert Trainer(fname, True).resume is True              # ijepa's positional form Trainer(fname, load_model)


@pytest.mark.timeout(30)
def test_requeued_trainer_without_a_checkpoint_starts_from_scratch(tmp_path):
    """Preempted before the first checkpoint was written: the requeued Trainer(resume=True) trains from step 0
    instead of failing on the missing file. (Outside a submitit job the Trainer runs as one process.)"""
    from main_distributed import Trainer
    out = tmp_path / 'out'
    fname = write_config(tmp_path / 'cfg.yaml', tiny_params(out, **{'optimization.max_steps': 2}))
    threads = torch.get_num_threads()
    try:
        result = Trainer(fname, resume=True)()
    finally:
        torch.set_num_threads(threads)
    assert result['start_step'] == 0 and result['step'] == 2
    assert load(out / 'jepa-latest.pth.tar')['step'] == 2


def _children(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.timeout(90)
@pytest.mark.skipif(not os.path.exists(f'/proc/{os.getpid()}/task/{os.getpid()}/children'),
                    reason='needs /proc/<pid>/task/<pid>/children (Linux)')
def test_requeue_on_timeout_signal_resumes_from_latest_checkpoint(tmp_path):
    """A timeout signal (as SLURM sends before the time limit) makes submitit call Trainer.checkpoint() and requeue
    the job; the new job resumes from the latest checkpoint and ends at the last step, with each step logged once."""
    import submitit

    from main_distributed import Trainer
    out = tmp_path / 'out'
    steps = 120
    params = tiny_params(out, **{'optimization.epochs': 15, 'optimization.max_steps': steps, 'logging.log_freq': 1,
                                 'logging.checkpoint_steps': 2})
    fname = write_config(tmp_path / 'cfg.yaml', params)
    executor = submitit.AutoExecutor(folder=tmp_path / 'submitit' / 'job_%j', cluster='local')
    executor.update_parameters(timeout_min=5, nodes=1, tasks_per_node=1, gpus_per_node=0)
    job = executor.submit(Trainer(fname))
    try:
        latest = out / 'jepa-latest.pth.tar'
        deadline = time.time() + 60
        while not latest.exists():                # the first mid-epoch checkpoint (step 2)
            assert job.state == 'RUNNING', job.stderr()
            assert time.time() < deadline, 'no checkpoint after 60 s'
            time.sleep(0.02)
        (task,) = _children(job._process.pid)     # the controller's only task
        os.kill(task, submitit.JobEnvironment._usr_sig())
        result = job.result()
    finally:
        job.cancel()
    log = job.stdout()
    assert 'Requeued job' in log, log[-3000:]
    assert 'called-params' in log and '(resume: True)' in log
    assert 0 < result['start_step'] < steps, f'the requeued job did not resume mid-run: {result}'
    assert result['step'] == steps
    assert load(latest)['step'] == steps
    header, rows = read_csv(out / 'jepa_r0.csv')
    ipe = 64 // 8
    assert [(int(r['epoch']) - 1) * ipe + int(r['itr']) for r in rows] == list(range(steps)), \
        'the CSV should hold every step once, in order'


@pytest.mark.timeout(60)
def test_misspelled_key_fails_at_start_up(tmp_path):
    params = ddp_params(tmp_path / 'out')
    params['optimization']['max_step'] = params['optimization'].pop('max_steps')
    fname = write_config(tmp_path / 'cfg.yaml', params)

    proc = run('main.py', '--fname', fname, '--devices', 'cpu', 'cpu', timeout=50)
    assert proc.returncode != 0
    assert 'optimization.max_step' in proc.stdout + proc.stderr

    logs = tmp_path / 'submitit'
    proc = run('main_distributed.py', '--fname', fname, '--folder', logs, '--cluster', 'local',
               '--tasks-per-node', 2, '--gpus-per-node', 0, '--wait', timeout=50)
    assert proc.returncode != 0
    assert 'optimization.max_step' in proc.stdout + proc.stderr
    assert not logs.exists(), 'nothing should be submitted'

    # --batch-launch: every listed config is validated before any is submitted
    good = write_config(tmp_path / 'good.yaml', ddp_params(tmp_path / 'out2'))
    batch = tmp_path / 'batch.yaml'
    batch.write_text(f'- {good}\n- {fname}\n')
    proc = run('main_distributed.py', '--batch-launch', '--fname', batch, '--folder', logs, '--cluster', 'local',
               '--gpus-per-node', 0, timeout=50)
    assert proc.returncode != 0
    assert 'optimization.max_step' in proc.stderr and str(fname) in proc.stderr
    assert not logs.exists() and not (tmp_path / 'out2').exists()
    # two configs writing to one folder would run at once into one CSV and one checkpoint
    twin = write_config(tmp_path / 'twin.yaml', ddp_params(tmp_path / 'out2', **{'meta.seed': 1}))
    batch.write_text(f'- {good}\n- {twin}\n')
    proc = run('main_distributed.py', '--batch-launch', '--fname', batch, '--folder', logs, '--cluster', 'local',
               '--gpus-per-node', 0, timeout=50)
    assert proc.returncode != 0 and 'both write to logging.folder' in proc.stderr, proc.stderr[-2000:]
    assert not logs.exists()


@pytest.mark.timeout(60)
def test_unavailable_devices_and_nodes_fail_at_start_up(tmp_path):
    """--devices naming a GPU this machine lacks, and --nodes 2 where submitit finds no SLURM (it would run the
    job locally on one node), stop with a message instead of a traceback."""
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(tmp_path / 'out'))
    proc = run('main.py', '--fname', fname, '--devices', 'cuda:99', timeout=50)
    assert proc.returncode != 0 and 'no such CUDA device' in proc.stderr and 'Traceback' not in proc.stderr
    import submitit
    if submitit.AutoExecutor.which() == 'slurm':
        return                                                           # --nodes 2 would really be submitted
    logs = tmp_path / 'submitit'
    proc = run('main_distributed.py', '--fname', fname, '--folder', logs, '--nodes', 2, '--tasks-per-node', 1,
               timeout=50)
    assert proc.returncode != 0 and 'no SLURM' in proc.stderr and 'Traceback' not in proc.stderr
    assert not logs.exists()


@pytest.mark.timeout(90)
def test_impossible_masks_and_missing_data_fail_at_start_up(tmp_path):
    """Mask settings no block can satisfy and a missing data set stop main.py before any process starts, naming
    the key; main_distributed.py refuses the masks before submitting anything."""
    impossible = write_config(tmp_path / 'masks.yaml', ddp_params(tmp_path / 'out', **{'mask.min_keep': 100}))
    proc = run('main.py', '--fname', impossible, '--devices', 'cpu', 'cpu', timeout=50)
    assert proc.returncode != 0 and 'min_keep' in proc.stderr, proc.stderr[-3000:]
    assert 'Running' not in proc.stdout and not (tmp_path / 'out').exists()
    proc = run('main.py', '--fname', missing_dataset_config(tmp_path), '--devices', 'cpu', timeout=50)
    assert proc.returncode != 0 and 'data.root_path' in proc.stderr and 'Running' not in proc.stdout

    # a folder holding another run's checkpoint (here: I-JEPA's, for a DSeq-JEPA config)
    from src.train import main as train_main
    train_main(ddp_params(tmp_path / 'ab', **{'optimization.max_steps': 1}))
    dseq = write_config(tmp_path / 'dseq.yaml', ddp_params(tmp_path / 'ab', **{'meta.method': 'dseq',
                                                                                  'meta.use_cls_token': True}))
    proc = run('main.py', '--fname', dseq, '--devices', 'cpu', timeout=50)
    assert proc.returncode != 0 and "meta.method: 'ijepa' there, 'dseq' here" in proc.stderr, proc.stderr[-3000:]
    assert 'Running' not in proc.stdout

    logs = tmp_path / 'submitit'
    proc = run('main_distributed.py', '--fname', impossible, '--folder', logs, '--cluster', 'local',
               '--tasks-per-node', 2, '--gpus-per-node', 0, '--wait', timeout=50)
    assert proc.returncode != 0 and 'min_keep' in proc.stderr and str(impossible) in proc.stderr
    assert not logs.exists(), 'nothing should be submitted'


@pytest.mark.timeout(90)
def test_main_set_overrides_config_keys(tmp_path):
    fname = write_config(tmp_path / 'cfg.yaml', ddp_params(tmp_path / 'out'))
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', '--set', 'optimization.max_steps=2',
               f'logging.folder={tmp_path / "other"}', 'meta.seed=3', timeout=80)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint = load(tmp_path / 'other' / 'jepa-latest.pth.tar')
    assert checkpoint['step'] == 2 and checkpoint['config']['meta']['seed'] == 3
    assert not (tmp_path / 'out').exists()
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', '--set', 'seed=3', timeout=30)
    assert proc.returncode != 0 and 'SECTION.KEY=VALUE' in proc.stderr
    proc = run('main.py', '--fname', fname, '--devices', 'cpu', '--set', 'meta.sed=3', timeout=30)
    assert proc.returncode != 0 and 'meta.sed' in proc.stderr
    # an empty config file is a config of defaults that --set can fill; a yaml that is not a mapping is refused
    (tmp_path / 'empty.yaml').write_text('')
    proc = run('main.py', '--fname', tmp_path / 'empty.yaml', '--devices', 'cpu', '--set', 'meta.sed=3', timeout=30)
    assert proc.returncode != 0 and 'meta.sed' in proc.stderr and 'Traceback' not in proc.stderr
    (tmp_path / 'list.yaml').write_text('- meta\n')
    proc = run('main.py', '--fname', tmp_path / 'list.yaml', '--devices', 'cpu', timeout=30)
    assert proc.returncode != 0 and 'expected a mapping' in proc.stderr and 'Traceback' not in proc.stderr
