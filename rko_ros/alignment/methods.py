"""The alignment methods by name, and the fine-tuning options that several layers check alike.

`rko finetune`, trainer_node, the demo's config and its bench all validate the same options before
anything runs; they do it here, so a rule changes in one place. Imports the standard library and
rko_ros.errors only (no torch): the nodes and the CLI check their parameters without the trainer.
"""
from rko_ros.errors import ConfigError

# The command line's and trainer_node's order: the default first.
METHODS = ('rko', 'kto', 'rpo', 'dpo', 'fkpd', 'sft')
# Methods that learn from (winner, loser) pairs of episodes.
PAIR_METHODS = ('dpo', 'rpo', 'fkpd')
# Methods that score undesirable windows on their own (KTO's per-episode feedback).
UNDESIRABLE_METHODS = ('kto', 'rko')
SELECT_CHOICES = ('margin', 'last')


def undesirable_share(method, lambda_retrieved, share):
    """The retrieved-undesirable share a run of `method` can use: `share` for kto/rko with the
    retrieval anchor on (the retrieval runs once for both sides), else 0."""
    return float(share) if lambda_retrieved and method in UNDESIRABLE_METHODS else 0.0


def check_finetune_options(error=ConfigError, names=None, *, method, lr, select, ema_decay,
                           lambda_retrieved, retrieved_undesirable_share, lambda_sft, lambda_u,
                           lambda_d, share_where_it_applies=False, max_lr=1.0):
    """Raise `error` naming the first invalid option and its fix. `names` maps an option to the
    caller's name for it (DemoConfig's `finetune_lr` is FinetuneConfig's `lr`). `max_lr`: the
    largest learning rate the caller accepts (FinetuneConfig 1, so a test can break a model on
    purpose; the demo 0.1).

    `share_where_it_applies`: a retrieved-undesirable share that `method` or a zero
    lambda_retrieved cannot use is allowed (the demo applies it where it can, see
    `undesirable_share`); otherwise it is refused, as `rko finetune` refuses it."""
    n = {k: (names or {}).get(k, k) for k in ('method', 'lr', 'select', 'ema_decay',
                                                'lambda_retrieved', 'retrieved_undesirable_share')}
    if method not in METHODS:
        raise error(f"{n['method']} '{method}' is unknown; choose one of {METHODS}")
    if not 0.0 < float(lr) <= max_lr:
        raise error(f'{n["lr"]}={lr} must be in (0, {max_lr}]')
    if select not in SELECT_CHOICES:
        raise error(f"{n['select']} '{select}' must be 'margin' or 'last'")
    if not 0.0 <= float(ema_decay) < 1.0:
        raise error(f'{n["ema_decay"]}={ema_decay} must be in [0, 1) (0 = off)')
    if float(lambda_retrieved) < 0:
        raise error(f'{n["lambda_retrieved"]}={lambda_retrieved} must be >= 0')
    for name, value in (('lambda_sft', lambda_sft), ('lambda_u', lambda_u), ('lambda_d', lambda_d)):
        if float(value) < 0:
            raise error(f'{name}={value} must be >= 0')
    share = float(retrieved_undesirable_share)
    if not 0.0 <= share < 1.0:
        raise error(f'{n["retrieved_undesirable_share"]}={share} must be in [0, 1)')
    if share_where_it_applies:
        return
    if share and method not in UNDESIRABLE_METHODS:
        raise error(f'{n["retrieved_undesirable_share"]} is for kto/rko (their undesirable '
                    f'windows); {method} has none')
    if share and not lambda_retrieved:
        raise error(f'{n["retrieved_undesirable_share"]} needs lambda_retrieved > 0 (the '
                    f'retrieval runs for both sides at once)')
