"""Errors that enginepy raises on bad input; the CLI turns them into one line and exit code 2."""


class EnginepyError(Exception):
    """Base class of the errors a user can fix."""


class InvalidParameter(EnginepyError, ValueError):
    """A parameter is outside its allowed range; the message names the parameter and the range."""


class ModelFileError(EnginepyError, FileNotFoundError):
    """A model directory or weight file is missing, incomplete or inconsistent; the message says what."""


def non_finite_logits_message(step: int, dtype, cfg_coef: float, request_id: str | None = None) -> str:
    """The message for NaN/inf logits at decode `step`, naming the likely cause for the decoder's dtype.

    In float16/bfloat16 the usual cause is an activation overflowing the format; in float32 (range 3.4e38,
    with cfg_coef and temperature bounded by params.check_sampling) it is almost always NaN/inf in the weights.
    """
    name = str(dtype).replace("torch.", "")
    where = f"at step {step}" + (f" of request {request_id!r}" if request_id is not None else "")
    if name == "float32":
        msg = (f"the decoder produced NaN/inf logits {where} in float32: the model weights probably hold NaN/inf "
               "values (convert the model again from a good checkpoint)")
    else:
        msg = (f"the decoder produced NaN/inf logits {where}: {name} likely overflowed (load the model with "
               "dtype='float32'), or the model weights hold NaN/inf values")
    if cfg_coef > 100:
        msg += f"; cfg_coef {cfg_coef:g} also amplifies the logits (audiocraft's default is 3)"
    return msg
