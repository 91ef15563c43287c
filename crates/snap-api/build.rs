//! Compiles `proto/snapd/v1/*.proto` with protox (pure Rust: no protoc needed) into tonic/prost
//! stubs, and keeps the file descriptor set for gRPC reflection.
//!
//! With the `serde` feature the messages also derive `serde::Serialize`, in the shape of the
//! proto3 JSON mapping with proto field names: an enum field (an `i32` in prost) is written as
//! its value's proto name through a serializer generated here per enum, and a oneof is
//! flattened into its message as the one field that is set.

use std::fmt::Write as _;
use std::path::PathBuf;

const PACKAGE: &str = "snapd.v1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = root.join("snapd/v1/snapd.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([&proto], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("snapd_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .message_attribute(
            ".",
            "#[cfg_attr(feature = \"serde\", derive(serde::Serialize))]",
        );
    let mut serializers = String::new();
    let mut enums_done = Vec::new();
    for file in fds.file.iter().filter(|f| f.package() == PACKAGE) {
        // Messages, nested ones (map entries) included, with their full proto names.
        let mut messages: Vec<_> = file
            .message_type
            .iter()
            .map(|m| (format!(".{PACKAGE}.{}", m.name()), m))
            .collect();
        while let Some((name, message)) = messages.pop() {
            messages.extend(
                message
                    .nested_type
                    .iter()
                    .map(|n| (format!("{name}.{}", n.name()), n)),
            );
            for oneof in &message.oneof_decl {
                let path = format!("{name}.{}", oneof.name());
                // Field attributes match by prefix too, and the oneof's variants are fields
                // under this path: the suffix form (no leading dot) matches the oneof field only.
                let field_path = &path[1..];
                builder = builder
                    .enum_attribute(
                        &path,
                        "#[cfg_attr(feature = \"serde\", derive(serde::Serialize))]",
                    )
                    .enum_attribute(
                        &path,
                        "#[cfg_attr(feature = \"serde\", serde(rename_all = \"snake_case\"))]",
                    )
                    .field_attribute(
                        field_path,
                        "#[cfg_attr(feature = \"serde\", serde(flatten))]",
                    );
            }
            for field in &message.field {
                if field.r#type() != prost_types::field_descriptor_proto::Type::Enum {
                    continue;
                }
                let enum_name = field.type_name();
                let Some(short) = enum_name
                    .strip_prefix(&format!(".{PACKAGE}."))
                    .filter(|s| !s.contains('.'))
                else {
                    return Err(format!(
                        "{name}.{}: enum {enum_name} is not a top-level enum of {PACKAGE}; teach \
                         crates/snap-api/build.rs its Rust path",
                        field.name()
                    )
                    .into());
                };
                if field.oneof_index.is_some()
                    || field.label() == prost_types::field_descriptor_proto::Label::Repeated
                {
                    return Err(format!(
                        "{name}.{}: enum fields in oneofs or repeated are not written as JSON \
                         names yet; teach crates/snap-api/build.rs",
                        field.name()
                    )
                    .into());
                }
                let function = snake_case(short);
                builder = builder.field_attribute(
                    format!("{}.{}", &name[1..], field.name()),
                    format!(
                        "#[cfg_attr(feature = \"serde\", serde(serialize_with = \"crate::json::{function}\"))]"
                    ),
                );
                if !enums_done.contains(&function) {
                    writeln!(
                        serializers,
                        "/// Writes a `{short}` field as its value's proto name (an unknown value as its number).\n\
                         pub fn {function}<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {{\n\
                         \x20   match crate::v1::{short}::try_from(*v) {{\n\
                         \x20       Ok(e) => s.serialize_str(e.as_str_name()),\n\
                         \x20       Err(_) => s.serialize_i32(*v),\n\
                         \x20   }}\n\
                         }}\n"
                    )?;
                    enums_done.push(function);
                }
            }
        }
    }
    std::fs::write(out.join("json_enums.rs"), serializers)?;
    builder.compile_fds(fds)?;
    Ok(())
}

/// `VmState` -> `vm_state`.
fn snake_case(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                s.push('_');
            }
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}
