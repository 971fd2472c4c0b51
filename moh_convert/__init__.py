"""moh_convert: convert Hugging Face causal LMs to Mixture-of-Head attention, calibrate, tune, evaluate, publish."""
from transformers import AutoConfig, AutoModelForCausalLM

from .modeling.configuration_moh import MoHConfig
from .modeling.modeling_moh import MoHForCausalLM

# Importing the package makes converted folders load natively (no trust_remote_code needed).
AutoConfig.register(MoHConfig.model_type, MoHConfig, exist_ok=True)
AutoModelForCausalLM.register(MoHConfig, MoHForCausalLM, exist_ok=True)

from .convert import ConvertOptions, convert  # noqa: E402
from .errors import MoHError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ConvertOptions", "MoHConfig", "MoHError", "MoHForCausalLM", "convert", "__version__"]
