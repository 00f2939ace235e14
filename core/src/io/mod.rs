//! Tensor and model-directory I/O: reading HF model directories through mmap,
//! the streaming sharded safetensors writer, whole-directory writing, storage
//! dtypes and the local Hugging Face cache.

pub mod dtype;
pub mod hf_dir;
pub mod hub;
pub mod model_dir;
pub mod writer;
