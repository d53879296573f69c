"""A ``FileDescriptorProto`` printed back as .proto (proto3) text: what ``regenerate`` uses to
recover Triton's protocol files from the descriptors a package ships without its .proto text.

Written here, not taken from a library: protobuf's Python package prints messages, not schemas.
It covers what Triton's two files use (proto3 messages, nested messages and enums, maps,
oneofs, ``optional``, streaming methods); anything else raises rather than print it wrongly.

Usage::

    from lmref.serving.grpc_gen.proto_text import proto_text

    text = proto_text(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_DOUBLE: "double",
    F.TYPE_FLOAT: "float",
    F.TYPE_INT64: "int64",
    F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32",
    F.TYPE_FIXED64: "fixed64",
    F.TYPE_FIXED32: "fixed32",
    F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string",
    F.TYPE_BYTES: "bytes",
    F.TYPE_UINT32: "uint32",
    F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64",
    F.TYPE_SINT32: "sint32",
    F.TYPE_SINT64: "sint64",
}


def _type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    return SCALARS.get(field.type) or field.type_name  # a message or enum: its full .name


def _unsupported(node, what: str) -> None:
    # Empty options are what a method's `{}` body leaves (printed back as `{}`); others raise.
    if node.HasField("options") and node.options.ByteSize() and what != "map":
        raise ValueError(f"{node.name}: options are not printed")


def _enum(enum: descriptor_pb2.EnumDescriptorProto, pad: str) -> list[str]:
    _unsupported(enum, "enum")
    lines = [f"{pad}enum {enum.name} {{"]
    lines += [f"{pad}  {v.name} = {v.number};" for v in enum.value]
    return [*lines, f"{pad}}}"]


def _field(field, maps: dict, pad: str) -> str:
    _unsupported(field, "field")
    if field.HasField("default_value") or field.HasField("extendee"):
        raise ValueError(f"{field.name}: proto2 features are not printed")
    entry = maps.get(field.type_name)
    if entry is not None:
        key, value = entry.field
        kind = f"map<{_type(key)}, {_type(value)}>"
    else:
        label = "repeated " if field.label == F.LABEL_REPEATED else ""
        kind = label + ("optional " if field.proto3_optional else "") + _type(field)
    return f"{pad}{kind} {field.name} = {field.number};"


def _message(message: descriptor_pb2.DescriptorProto, scope: str, pad: str) -> list[str]:
    _unsupported(message, "message")
    if message.extension_range or message.reserved_range or message.extension:
        raise ValueError(f"{message.name}: extensions and reserved ranges are not printed")
    full = f"{scope}.{message.name}"
    maps = {f"{full}.{n.name}": n for n in message.nested_type if n.options.map_entry}
    lines = [f"{pad}message {message.name} {{"]
    for nested in message.nested_type:
        if not nested.options.map_entry:
            lines += _message(nested, full, pad + "  ")
    for enum in message.enum_type:
        lines += _enum(enum, pad + "  ")
    # Fields in declaration order: a real oneof's fields sit together inside its block.
    printed = set()
    for field in message.field:
        real_oneof = field.HasField("oneof_index") and not field.proto3_optional
        if not real_oneof:
            lines.append(_field(field, maps, pad + "  "))
        elif field.oneof_index not in printed:
            printed.add(field.oneof_index)
            lines.append(f"{pad}  oneof {message.oneof_decl[field.oneof_index].name} {{")
            lines += [
                _field(f, maps, pad + "    ")
                for f in message.field
                if f.HasField("oneof_index") and f.oneof_index == field.oneof_index
            ]
            lines.append(f"{pad}  }}")
    return [*lines, f"{pad}}}"]


def proto_text(file: descriptor_pb2.FileDescriptorProto) -> str:
    """The .proto text of ``file`` (proto3)."""
    if file.syntax != "proto3" or file.HasField("options"):
        raise ValueError(f"{file.name}: only option-free proto3 files are printed")
    lines = ['syntax = "proto3";', "", f"package {file.package};", ""]
    lines += [f'import "{d}";' for d in file.dependency] + ([""] if file.dependency else [])
    scope = "." + file.package
    for enum in file.enum_type:
        lines += [*_enum(enum, ""), ""]
    for message in file.message_type:
        lines += [*_message(message, scope, ""), ""]
    for service in file.service:
        lines.append(f"service {service.name} {{")
        for m in service.method:
            _unsupported(m, "method")
            stream_in = "stream " if m.client_streaming else ""
            stream_out = "stream " if m.server_streaming else ""
            body = " {}" if m.HasField("options") else ";"
            lines.append(
                f"  rpc {m.name}({stream_in}{m.input_type}) returns ({stream_out}{m.output_type}){body}"
            )
        lines += ["}", ""]
    return "\n".join(lines)
