// Reads the PTX of one module (emu/libcuda/ptx.h). Not a PTX parser: enough
// of the syntax nvcc emits for kernels/*.cu (module-scope .shared variables,
// .entry headers, one instruction per line, virtual registers).
#include "ptx.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

namespace emu {
namespace libcuda {
namespace ptx {
namespace {

struct SharedVariable {
  unsigned align;
  size_t bytes;  // 0 for `.extern` (dynamic) arrays
  bool dynamic;
};

bool starts_with(const std::string& s, const char* prefix) { return s.compare(0, std::strlen(prefix), prefix) == 0; }

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r") - b + 1);
}

// Bytes of a PTX scalar type suffix (".f32", ".b64", ".f16x2", ...); 0 if none.
size_t type_bytes(const std::string& type) {
  static const std::map<std::string, size_t> widths = {
      {"b8", 1},  {"u8", 1},  {"s8", 1},  {"b16", 2},   {"u16", 2},   {"s16", 2}, {"f16", 2}, {"bf16", 2},
      {"b32", 4}, {"u32", 4}, {"s32", 4}, {"f32", 4},   {"f16x2", 4}, {"bf16x2", 4}, {"b64", 8}, {"u64", 8},
      {"s64", 8}, {"f64", 8}, {"b128", 16}};
  const auto it = widths.find(type);
  return it == widths.end() ? 0 : it->second;
}

// The dot-separated parts of an opcode ("ld.shared.v4.f32" -> ld shared v4 f32).
std::vector<std::string> opcode_parts(const std::string& opcode) {
  std::vector<std::string> parts;
  size_t at = 0;
  while (at <= opcode.size()) {
    const size_t dot = opcode.find('.', at);
    parts.push_back(opcode.substr(at, dot == std::string::npos ? std::string::npos : dot - at));
    if (dot == std::string::npos) break;
    at = dot + 1;
  }
  return parts;
}

// `.shared .align A .TYPE NAME[N];` and `.extern .shared ... NAME[];` at module scope.
std::map<std::string, SharedVariable> shared_variables(const std::string& ptx, std::vector<std::string>& order) {
  std::map<std::string, SharedVariable> vars;
  size_t at = 0;
  while (at < ptx.size()) {
    const size_t end = std::min(ptx.find('\n', at), ptx.size());
    const std::string line = trim(ptx.substr(at, end - at));
    at = end + 1;
    const bool dynamic = starts_with(line, ".extern .shared ");
    if (!dynamic && !starts_with(line, ".shared ")) continue;
    const size_t align_at = line.find(".align ");
    unsigned align = align_at == std::string::npos ? 1 : static_cast<unsigned>(std::atoi(line.c_str() + align_at + 7));
    // The type is the last dotted word before the name.
    const size_t semicolon = line.find(';');
    std::string decl = line.substr(0, semicolon);
    const size_t bracket = decl.find('[');
    const std::string head = decl.substr(0, bracket);
    const size_t name_at = head.find_last_of(" \t") + 1;
    const std::string name = head.substr(name_at);
    const std::string type_word = trim(head.substr(0, name_at));
    const size_t type_dot = type_word.find_last_of('.');
    size_t bytes = type_bytes(type_word.substr(type_dot + 1));
    if (bracket != std::string::npos) bytes *= std::strtoull(decl.c_str() + bracket + 1, nullptr, 10);
    if (align == 0) align = 1;
    vars[name] = SharedVariable{align, dynamic ? 0 : bytes, dynamic};
    order.push_back(name);
  }
  return vars;
}

// Sizes of the .param list of one entry (`.param .u64 name`, `.param .align 8
// .b8 name[88]` for a struct by value).
std::vector<size_t> param_sizes(const std::string& params) {
  std::vector<size_t> sizes;
  size_t at = 0;
  while ((at = params.find(".param", at)) != std::string::npos) {
    size_t end = params.find_first_of(",\n", at + 6);
    if (end == std::string::npos) end = params.size();
    const std::string decl = params.substr(at, end - at);
    size_t bytes = 0;
    for (const char* t : {".u64", ".s64", ".b64", ".f64", ".u32", ".s32", ".b32", ".f32", ".u16", ".s16", ".b16",
                          ".f16", ".u8", ".s8", ".b8"}) {
      if (decl.find(std::string(t) + " ") != std::string::npos) {
        bytes = type_bytes(t + 1);
        break;
      }
    }
    const size_t bracket = decl.find('[');
    if (bracket != std::string::npos) bytes *= std::strtoull(decl.c_str() + bracket + 1, nullptr, 10);
    sizes.push_back(bytes);
    at = end;
  }
  return sizes;
}

// Operands of one instruction, split at top-level commas ({...} and [...] stay whole).
std::vector<std::string> operands(const std::string& text) {
  std::vector<std::string> out;
  int depth = 0;
  std::string current;
  for (char c : text) {
    if (c == '{' || c == '[') ++depth;
    if (c == '}' || c == ']') --depth;
    if (c == ',' && depth == 0) {
      out.push_back(trim(current));
      current.clear();
    } else {
      current += c;
    }
  }
  if (!trim(current).empty()) out.push_back(trim(current));
  return out;
}

// Register names and identifiers in an operand.
std::vector<std::string> words(const std::string& operand) {
  std::vector<std::string> out;
  std::string current;
  for (char c : operand) {
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '%' || c == '$') {
      current += c;
    } else if (!current.empty()) {
      out.push_back(current);
      current.clear();
    }
  }
  if (!current.empty()) out.push_back(current);
  return out;
}

struct Instruction {
  std::string opcode;
  std::vector<std::string> operands;
};

// One instruction per `;`, after dropping comments, labels, braces and
// directives (.reg, .local, .pragma); the predicate guard is dropped too.
std::vector<Instruction> instructions(const std::string& body) {
  std::string code;
  size_t at = 0;
  while (at < body.size()) {
    size_t end = body.find('\n', at);
    if (end == std::string::npos) end = body.size();
    std::string line = body.substr(at, end - at);
    at = end + 1;
    const size_t comment = line.find("//");
    if (comment != std::string::npos) line.erase(comment);
    line = trim(line);
    if (line.empty() || line == "{" || line == "}" || line.back() == ':' || line[0] == '.') continue;
    code += line + " ";
  }
  std::vector<Instruction> out;
  at = 0;
  while (at < code.size()) {
    size_t end = code.find(';', at);
    if (end == std::string::npos) end = code.size();
    std::string text = trim(code.substr(at, end - at));
    at = end + 1;
    if (!text.empty() && text[0] == '@') {
      const size_t space = text.find_first_of(" \t");
      text = space == std::string::npos ? "" : trim(text.substr(space));
    }
    if (text.empty()) continue;
    const size_t space = text.find_first_of(" \t");
    Instruction ins;
    ins.opcode = text.substr(0, space);
    if (space != std::string::npos) ins.operands = operands(text.substr(space + 1));
    out.push_back(ins);
  }
  return out;
}

// Instructions whose first operand is not a value derived from the others.
bool writes_no_address(const std::string& opcode) {
  for (const char* p : {"ld", "st", "cp.", "bar", "bra", "ret", "red", "atom", "shfl", "mma", "wmma", "call", "fence",
                        "membar", "vote", "match", "redux", "tex", "exit", "trap"}) {
    if (starts_with(opcode, p)) return true;
  }
  return false;
}

// The width in bytes of a vector access to memory, and the index of its
// address operand; 0 when the instruction is none.
size_t vector_access(const Instruction& ins, size_t& address) {
  const auto parts = opcode_parts(ins.opcode);
  const std::string& op = parts[0];
  for (const auto& part : parts) {
    if (part == "global" || part == "param" || part == "local" || part == "const") return 0;
  }
  if (op == "ldmatrix" || op == "stmatrix") {
    address = op == "ldmatrix" ? 1 : 0;
    return 16;
  }
  if (op == "cp" && parts.size() > 1 && parts[1] == "async" && ins.operands.size() >= 3 &&
      ins.opcode.find(".shared") != std::string::npos) {
    address = 0;
    return std::strtoul(ins.operands[2].c_str(), nullptr, 10);
  }
  if (op != "ld" && op != "st") return 0;
  size_t lanes = 1, element = 0;
  for (const auto& part : parts) {
    if (part == "v2") lanes = 2;
    if (part == "v4") lanes = 4;
    if (part == "v8") lanes = 8;
    if (type_bytes(part) != 0) element = type_bytes(part);
  }
  if (lanes == 1) return 0;
  address = op == "ld" ? 1 : 0;
  return lanes * element;
}

}  // namespace

std::map<std::string, Entry> parse(const char* text, std::vector<std::string>& problems) {
  const std::string ptx(text);
  std::vector<std::string> declaration_order;
  const auto vars = shared_variables(ptx, declaration_order);
  std::map<std::string, Entry> entries;
  size_t at = 0;
  while ((at = ptx.find(".entry ", at)) != std::string::npos) {
    at += 7;
    const size_t open = ptx.find('(', at), close = open == std::string::npos ? open : ptx.find(')', open);
    if (close == std::string::npos) break;
    std::string name = trim(ptx.substr(at, open - at));
    Entry entry;
    entry.param_bytes = param_sizes(ptx.substr(open + 1, close - open - 1));
    const size_t body_open = ptx.find('{', close);
    if (body_open == std::string::npos) break;
    const std::string directives = ptx.substr(close + 1, body_open - close - 1);
    const size_t maxntid = directives.find(".maxntid");
    if (maxntid != std::string::npos) {
      entry.max_threads = 1;
      for (const auto& d : operands(directives.substr(maxntid + 8, directives.find('\n', maxntid) - maxntid - 8))) {
        entry.max_threads *= static_cast<unsigned>(std::strtoul(d.c_str(), nullptr, 10));
      }
    } else {
      problems.push_back("kernel " + name +
                         " states no block size: every kernel has __launch_bounds__ (a driver's JIT may give a "
                         "kernel without it more registers than a large block can have)");
    }
    int depth = 0;
    size_t body_close = body_open;
    for (; body_close < ptx.size(); ++body_close) {
      if (ptx[body_close] == '{') ++depth;
      if (ptx[body_close] == '}' && --depth == 0) break;
    }
    const auto body = instructions(ptx.substr(body_open + 1, body_close - body_open - 1));
    at = body_close;

    // Which shared variables each register's value derives from; repeated
    // until nothing changes, for values carried around loops.
    std::map<std::string, std::set<std::string>> derives;
    std::set<std::string> named;
    for (bool changed = true; changed;) {
      changed = false;
      for (const auto& ins : body) {
        if (ins.operands.empty()) continue;
        std::set<std::string> sources;
        for (size_t i = 0; i < ins.operands.size(); ++i) {
          for (const auto& w : words(ins.operands[i])) {
            if (vars.count(w) != 0) {
              named.insert(w);
              if (i > 0) sources.insert(w);
            } else if (i > 0 && w[0] == '%' && derives.count(w) != 0) {
              sources.insert(derives[w].begin(), derives[w].end());
            }
          }
        }
        if (writes_no_address(ins.opcode) || sources.empty()) continue;
        for (const auto& w : words(ins.operands[0])) {
          if (w[0] != '%') continue;
          auto& set = derives[w];
          const size_t before = set.size();
          set.insert(sources.begin(), sources.end());
          changed = changed || set.size() != before;
        }
      }
    }
    std::set<std::string> reported;  // one line per variable
    for (const auto& ins : body) {
      size_t address = 0;
      const size_t width = vector_access(ins, address);
      if (width == 0 || address >= ins.operands.size()) continue;
      const std::string& operand = ins.operands[address];
      const auto base = words(operand);
      if (base.empty()) continue;
      const size_t plus = operand.find('+');
      const long long offset = plus == std::string::npos ? 0 : std::strtoll(operand.c_str() + plus + 1, nullptr, 10);
      std::set<std::string> from;
      if (vars.count(base[0]) != 0) from.insert(base[0]);
      if (derives.count(base[0]) != 0) from = derives[base[0]];
      for (const auto& var : from) {
        const unsigned align = vars.at(var).align;
        if ((align < width || offset % static_cast<long long>(width) != 0) && reported.insert(var).second) {
          char line[512];
          std::snprintf(line, sizeof line,
                        "kernel %s: `%s` makes a %zu-byte access at offset %lld of shared variable %s, declared "
                        ".align %u: declare it alignas(%zu) (or __align__)",
                        name.c_str(), ins.opcode.c_str(), width, offset, var.c_str(), align, width);
          problems.push_back(line);
        }
      }
    }
    for (const auto& var : declaration_order) {
      const auto& v = vars.at(var);
      if (v.dynamic || named.count(var) == 0) continue;
      entry.static_shared_bytes = (entry.static_shared_bytes + v.align - 1) / v.align * v.align;
      entry.static_shared_bytes += static_cast<unsigned>(v.bytes);
    }
    entries[name] = entry;
  }
  return entries;
}

}  // namespace ptx
}  // namespace libcuda
}  // namespace emu
