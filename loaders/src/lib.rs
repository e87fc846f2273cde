#![warn(missing_docs)]
//! Loaders for llama-family models: configs, weights (local safetensors, HF Hub, GGUF), the
//! tokenizer with its chat template, and the one model file ([`llama`]).
//!
//! A model is named by a [`ModelSource`]: a registered name (`smollm2-135m-instruct`), a local
//! directory, a `.gguf` file, or an HF Hub repo id. [`load()`] turns it into a ready [`Loaded`].

pub mod config;
pub mod error;
pub mod gguf;
pub mod heads;
pub mod hub;
pub mod load;

pub mod llama;
pub mod random;
pub mod registry;
pub mod tokenizer;

pub use config::{Arch, Config, Llama3RopeScaling, RopeScaling, YarnRopeScaling};
pub use error::{LoadError, Result};
pub use hub::HubRepo;
pub use llama::{Cache, Model};
pub use load::{load, load_hub, load_with, parse_dtype, Loaded, ModelSource, Overrides};
pub use tokenizer::{ChatMessage, Tokenizer};
