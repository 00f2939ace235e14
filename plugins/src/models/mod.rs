//! Built-in source models: one decoder for the Llama family (`decoder.rs`)
//! and its three flavours, each a plugin file.

pub mod decoder;

pub mod llama;
pub mod mistral;
pub mod mixtral;
