"""Team mode's service stack: ``scripts/stack.sh up | env | status | down``.

On 127.0.0.1 only, with all state under ``.stack/`` in the repository root (``RLFN_STACK_DIR``
moves it). The services, each an entry of ``services.TABLE`` (in dependency order):

=============  ===================================================  ====================
service        what                                                 default port (env)
=============  ===================================================  ====================
postgresql     a cluster of the project's own (scram-sha-256),      55432
               databases ``mlflow``, ``prefect``, ``optuna``, role  (RLFN_STACK_PG_PORT)
               ``rlfn``; ``optuna``: Optuna's schema in it
mlflow         ``mlflow server`` on PostgreSQL, artifacts served    55000
               by the server, basic-auth app                        (RLFN_STACK_MLFLOW_PORT)
prefect        ``prefect server start`` on PostgreSQL, API auth     54200
               string; ``work pool`` rlfn-pool and rlfn-serve   (RLFN_STACK_PREFECT_PORT)
               with prefect.yaml's ``deployments``;
               ``automations``: a flow run with no heartbeat
               for 300 s is marked CRASHED
worker         ``prefect worker start --pool rlfn-pool``            -
rollout-worker ``prefect worker start --pool rlfn-serve``: the      -
               rollout only, on this host even with
               RLFN_STACK_WORKER=0
webhooks       the receiver of MLflow's registry webhook            55070
               ``model_version_alias.created`` (HMAC checked) ->    (RLFN_STACK_HOOK_PORT)
               the Prefect event that runs ``rlfn-serve/rollout``
serve          the served endpoint: an nginx of its own in front    55080, instances at
               of ``mlflow models serve`` of the serving version    +1.. (RLFN_STACK_SERVE_PORT)
               (``RLFN_SERVE_URL``; off loopback over TLS on ADDR,
               ``RLFN_SERVE_CA``)
sshd           a private sshd (key only) for the DVC remote         52222
               ``stack`` (this clone's default, .dvc/config.local)  (RLFN_STACK_SSH_PORT)
=============  ===================================================  ====================

Off loopback (``up --host ADDR`` or ``RLFN_STACK_HOST``; 127.0.0.1 is the default) two more
entries start first and between: ``tls`` (a CA of the stack's own and a server certificate for
ADDR, in ``tls/``, owner-only) and ``nginx`` (the TLS end of MLflow and Prefect on ADDR, at
their ports; the servers stay on 127.0.0.1); PostgreSQL takes SSL (hostssl only from other
hosts) and sshd listens on ADDR too, also serving the team's git repository (``git/``,
``RLFN_GIT_URL``). ``bundle FILE`` writes what another host needs (module ``bundle``); ``env
--bundle FILE`` uses it there; ``join FILE [--pool NAME]`` makes a worker host of another one
(module ``join``: its own clone of RLFN_GIT_URL, DVC remote and Prefect worker; ``status`` and
``down`` there are its worker's). Work in progress: docs/multihost-status.md.

Modules: ``core`` (layout, settings, secrets, the context ``Ctx``), ``procs`` (daemons, pid
files, logged commands, ports), ``web`` (HTTP, and the start and health check shared by the
HTTP servers), one module per service (``postgresql``, ``mlflow_server``, ``prefect_server``,
``webhooks``, ``serve``, ``sshd``), ``services`` (the table), ``cli`` (the verbs).

Layout of the state directory::

    secrets/stack.json   generated passwords (dir 0700, file 0600); only `env` prints them
    postgres/data        the cluster (owned by the ``postgres`` OS user when run as root)
    mlflow/              basic_auth.ini and the auth app's own SQLite database
    mlartifacts/         the artifacts the MLflow server stores
    prefect/             PREFECT_HOME
    ssh/                 sshd_config, host key, authorized_keys, the client key, known_hosts,
                         git_ssh_config (GIT_SSH_COMMAND's, off loopback)
    dvc-remote/          the DVC remote's storage
    git/rlfn-pipeline.git  the team's git repository (off loopback; RLFN_GIT_URL)
    project/             on a worker host (``join``): its clone of RLFN_GIT_URL
    logs/<service>.log   each service's output
    serve/               the endpoint's nginx (nginx.conf, route.conf: the serving version),
                         state.json (the version serving), v<N>/ (its servers' work dirs)
    run/                 pid files (<service>.pid; serve-<slot>-<i>.pid: the model servers)
                         and state.json (ports, project directory)

Other settings: ``RLFN_PROJECT_DIR`` (the clone the worker runs flows in and whose
.dvc/config.local gets the remote; default: this repository), ``RLFN_STACK_TIMEOUT`` (seconds a
service gets to become ready, default 120), ``RLFN_STACK_MLFLOW_WORKERS`` (default 1),
``RLFN_STACK_WORKER_POLL_S`` (how often the worker asks for flow runs; Prefect's default 10),
``RLFN_STACK_WORKER=0`` (no worker on this host: the pool's workers join from others; recorded
by ``up``), ``RLFN_STACK_WORKER_LIMIT`` (flow runs the worker runs at once, default no limit;
its flow runs then split the cores between them: ``RLFN_PROCESSES``, see rlfn.threads),
``RLFN_STACK_PG_OS_USER`` (as root, the OS user PostgreSQL runs as; default postgres).
"""
