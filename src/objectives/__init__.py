# One objective per method; the training loop only chooses it (meta.method).
from src.objectives.dseq import DSeqJEPA
from src.objectives.ijepa import IJEPA

OBJECTIVES = {'ijepa': IJEPA, 'dseq': DSeqJEPA}


def make_objective(cfg, encoder, predictor, target_encoder):
    return OBJECTIVES[cfg.meta.method](cfg, encoder, predictor, target_encoder)


def objective_class(cfg):
    return OBJECTIVES[cfg.meta.method]
