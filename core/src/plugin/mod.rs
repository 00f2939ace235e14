//! The plugin system: the registry of every extension point's plugins with
//! their parameter specs, the versioned C ABI, the safe SDK that plugin
//! authors implement, and the loader of plugin libraries.

pub mod abi;
pub mod dynamic;
pub mod registry;
pub mod sdk;
